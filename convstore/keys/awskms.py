"""Master key in AWS KMS (or any endpoint speaking its API), via boto3.

Spec: ``awskms:KEY-ID-OR-ARN-OR-ALIAS``.  The endpoint comes from
``--kms-endpoint`` / ``$CONVSTORE_KMS_ENDPOINT``, else boto3's usual
configuration (``AWS_ENDPOINT_URL_KMS``, region, credentials chain).  Data
keys come from ``GenerateDataKey`` and are wrapped with ``Encrypt`` under an
``EncryptionContext``; KMS's own CloudTrail log records every call.
Wrapped form: ``b"CSA" | version | KMS CiphertextBlob``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import KeyAccessDenied, KeyNotFound, KeyProviderError, KeyProviderUnavailable, StoreFormatError
from .base import KeyProvider

MAGIC = b"CSA"
VERSION = 1
_DENIED = {"AccessDeniedException", "DisabledException", "KMSInvalidStateException", "InvalidCiphertextException",
           "IncorrectKeyException", "InvalidGrantTokenException", "KMSInvalidSignatureException",
           "UnrecognizedClientException", "InvalidSignatureException"}


class AWSKMSKey(KeyProvider):
    scheme = "awskms"

    def __init__(self, key: str, endpoint: str | None = None):
        try:
            import boto3
            import botocore.exceptions
        except ImportError:
            raise KeyProviderUnavailable("the awskms provider needs boto3: pip install 'convstore[aws]'") from None
        self._errors = botocore.exceptions
        endpoint = endpoint or os.environ.get("CONVSTORE_KMS_ENDPOINT")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self._kms = boto3.client("kms", endpoint_url=endpoint, region_name=region)
        self._key = key
        self._endpoint = endpoint
        meta = self._call("DescribeKey", self._kms.describe_key, KeyId=key)["KeyMetadata"]
        self._arn = meta["Arn"]

    @property
    def key_id(self) -> str:
        return f"awskms:{self._arn}"

    @property
    def spec(self) -> str:
        return f"awskms:{self._key}"

    @property
    def endpoint(self) -> str | None:
        return self._endpoint

    def _call(self, op: str, fn: Any, **kw: Any) -> Any:
        try:
            return fn(**kw)
        except self._errors.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code == "NotFoundException":
                raise KeyNotFound(f"KMS key {self._key} does not exist") from None
            if code in _DENIED:
                raise KeyAccessDenied(f"KMS denied {op} with key {self._key}: {code}") from None
            raise KeyProviderError(f"KMS {op} failed: {code}") from None
        except (self._errors.EndpointConnectionError, self._errors.ConnectTimeoutError,
                self._errors.ReadTimeoutError) as e:
            raise KeyProviderUnavailable(f"cannot reach KMS{' at ' + self._endpoint if self._endpoint else ''}: "
                                         f"{type(e).__name__}") from None
        except self._errors.NoCredentialsError:
            raise KeyProviderUnavailable("no AWS credentials for KMS") from None

    def wrap(self, plaintext_key: bytes, context: Mapping[str, str]) -> bytes:
        r = self._call("Encrypt", self._kms.encrypt, KeyId=self._arn, Plaintext=plaintext_key,
                       EncryptionContext=dict(context))
        return MAGIC + bytes((VERSION,)) + r["CiphertextBlob"]

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        if len(wrapped) < 5 or wrapped[:3] != MAGIC:
            raise KeyAccessDenied("wrapped key is not a KMS wrapped key")
        if wrapped[3] != VERSION:
            raise StoreFormatError(f"KMS wrapped key version {wrapped[3]} is not supported")
        r = self._call("Decrypt", self._kms.decrypt, KeyId=self._arn, CiphertextBlob=wrapped[4:],
                       EncryptionContext=dict(context))
        return bytes(r["Plaintext"])

    def generate(self, context: Mapping[str, str], size: int = 32) -> tuple[bytes, bytes]:
        r = self._call("GenerateDataKey", self._kms.generate_data_key, KeyId=self._arn, NumberOfBytes=size,
                       EncryptionContext=dict(context))
        return bytes(r["Plaintext"]), MAGIC + bytes((VERSION,)) + r["CiphertextBlob"]
