"""Running convstore as a service: systemd's readiness protocol
(:mod:`.sdnotify`), the ``--background`` parent's wait for it
(:mod:`.background`), service logging (:mod:`.logs`) and the config file
(:mod:`.config`).  Standard library only, below every other band."""
