"""Errors the CLI turns into exit codes (docs/spec.md section 5). Messages are one line."""


class IpmasqError(Exception):
    exit_code = 1

    def __str__(self) -> str:
        # One line, always: a value with a newline in it must not break the message.
        return " ".join(super().__str__().split("\n"))


class ConfigError(IpmasqError):
    """Bad usage or bad config: nothing was touched."""

    exit_code = 2


class ApplyError(IpmasqError):
    """The change could not be made; the live state was left as it was."""

    exit_code = 1


class BackendUnavailable(ApplyError):
    """The chosen backend cannot run on this node (tools or kernel missing)."""


class LockTimeout(IpmasqError):
    exit_code = 3
