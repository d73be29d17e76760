"""What can go wrong in the local workspace, in the service's own terms (no HTTP here).

The backends (clusters, contexts, files, serving) raise these; the wire layer (``wire.py``) is
the one place that turns each into the status and body the real service answers with, which
differ between the Command Execution API 1.2 (``{"error": ...}``) and the 2.x APIs
(``{"error_code", "message"}``).
"""


class ServiceError(Exception):
    """A request the service refuses. ``message`` is the text the answer carries."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class InvalidParameter(ServiceError):
    """A field is missing or wrong (1.2: java.lang.IllegalArgumentException)."""


class ClusterNotFound(InvalidParameter):
    def __init__(self, cluster_id):
        super().__init__("Cluster %s does not exist" % cluster_id)


class UnsupportedLanguage(InvalidParameter):
    def __init__(self, language):
        # The real service's answer to a language a cluster cannot run is UNVERIFIED
        # (tests/local_workspace/README.md): an IllegalArgumentException like its other 1.2 errors.
        super().__init__("language %r is not supported by the local workspace (python and sql "
                         "only)" % language)


class RequirementFailed(InvalidParameter):
    """A precondition of the 1.2 gateway (Scala's ``require``): "requirement failed: ..."."""


class MalformedRequest(ServiceError):
    """The request body is not a JSON object."""


class InvalidState(ServiceError):
    """The resource is in a state that refuses the call (1.2: java.lang.IllegalStateException)."""


class ClusterNotReady(ServiceError):
    """The cluster's driver cannot take 1.2 calls yet (ClusterNotReadyException)."""

    def __init__(self, cluster_id, state=None, message=None):
        super().__init__(message or "Cluster %s is not currently ready for driver client "
                                    "(state %s)" % (cluster_id, state))


class TooManyContexts(ServiceError):
    def __init__(self, limit):
        super().__init__("Too many execution contexts are open right now.(Limit set currently "
                         "to %d)" % limit)


class ContextDisconnected(ServiceError):
    """Every unknown, closed or dead execution context gets this one answer."""

    def __init__(self, context_id):
        super().__init__("Context ExecutionContextId(%s) is disconnected." % context_id)


class CommandNotFound(ServiceError):
    def __init__(self, command_id, context_id):
        super().__init__("Command %s not found in context %s" % (command_id, context_id))


class ResourceDoesNotExist(ServiceError):
    pass


class ResourceAlreadyExists(ServiceError):
    pass


class DirectoryNotEmpty(ServiceError):
    pass


class MaxReadSizeExceeded(ServiceError):
    pass


class MaxBlockSizeExceeded(ServiceError):
    pass


class MethodNotAllowed(ServiceError):
    pass


class BadRequest(ServiceError):
    pass


class EndpointNotFound(ServiceError):
    """No such API, or no such serving endpoint."""


class InternalError(ServiceError):
    pass


class Throttled(ServiceError):
    """REQUEST_LIMIT_EXCEEDED; the client may retry after ``retry_after`` seconds."""

    def __init__(self, message, retry_after=1):
        super().__init__(message)
        self.retry_after = retry_after


class Unauthenticated(ServiceError):
    pass


class PermissionDenied(ServiceError):
    pass
