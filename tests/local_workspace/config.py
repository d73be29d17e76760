"""The settings of a local workspace: one object every backend reads from, and its facts.

``Config`` holds the ``configure`` keys (validated, behind its own lock). The wire layer and each
backend get the same ``Config`` when the workspace is built and read the current value of a key
when they need it, so ``configure()`` takes effect on the next request.
"""

import threading

OWNER = "analyst@example.com"
USER_ID = "4242424242424242"
WORKSPACE_ID = "1234567890123456"

CANCEL_MODES = ("cancelled", "finished_error")
NOT_RUNNING_MODES = ("error", "not_ready")
PLOTS_MODES = ("repr", "images")
OUTPUT_OVERFLOWS = ("discard", "truncate")
STANDARD_PY4J_MODES = ("context_methods", "get_context")

DEFAULTS = {
    # Output limits follow each cluster's runtime (contexts.Contexts._over_the_text_limit):
    # DBR <= 16.4 text results in characters and what happens past them; DBR >= 17.0 a cell's
    # output in MB.
    "output_limit": 50_000,
    "output_overflow": "truncate",
    "cell_output_mb": 10,
    "context_limit": 145,
    "idle_ttl": None,
    "cancel_mode": "cancelled",
    "not_running_mode": "error",
    "start_delay": 2.0,
    "llm_latency": 0.0,
    "image_inline_limit": 512 * 1024,
    # The awkward behaviours of the real service (tests/local_workspace/README.md, "Behaviours"):
    "plots_mode": "repr",
    "pip_restarts": False,
    "restart_window": 2.0,
    "ready_delay": 1.0,
    "idle_context_tracking": True,
    "shutdown_aborts_commands": True,
    "context_error_next": 0,
    "latency_ms": 0,
    # Standard access mode: which py4j call into the notebook context is refused as not
    # whitelisted (dbutils.py): "context_methods" (getContext() answers, its methods raise:
    # tags() in S30) or "get_context" (getContext() itself raises).
    "standard_py4j": "context_methods",
}
_CHOICES = {"cancel_mode": CANCEL_MODES, "not_running_mode": NOT_RUNNING_MODES,
            "plots_mode": PLOTS_MODES, "output_overflow": OUTPUT_OVERFLOWS,
            "standard_py4j": STANDARD_PY4J_MODES}
_BOOLEANS = ("pip_restarts", "idle_context_tracking", "shutdown_aborts_commands")
_COUNTS = ("output_limit", "cell_output_mb", "context_limit", "image_inline_limit",
           "context_error_next", "latency_ms")
_SECONDS = ("idle_ttl", "start_delay", "llm_latency", "restart_window", "ready_delay")


def validated(settings):
    """``settings`` checked and normalised (seconds as floats); ValueError names the bad key."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ValueError("unknown setting(s): %s" % ", ".join(sorted(unknown)))
    out = dict(settings)
    for key, choices in _CHOICES.items():
        if key in out and out[key] not in choices:
            raise ValueError("%s must be one of %s" % (key, choices))
    for key in _BOOLEANS:
        if key in out and not isinstance(out[key], bool):
            raise ValueError("%s must be true or false" % key)
    for key in _COUNTS:
        if key in out and (not isinstance(out[key], int) or out[key] < 0):
            raise ValueError("%s must be a non-negative integer" % key)
    if "cell_output_mb" in out and not 1 <= out["cell_output_mb"] <= 20:
        raise ValueError("cell_output_mb must be between 1 and 20 (as "
                         "%set_cell_max_output_size_in_mb takes)")
    for key in _SECONDS:
        if key in out and out[key] is not None:
            out[key] = float(out[key])
    return out


class Config:
    """The current settings (``DEFAULTS`` updated by ``update``), safe to read from any thread."""

    def __init__(self, **settings):
        self._lock = threading.Lock()
        self._values = dict(DEFAULTS)
        self.update(**settings)

    def __getitem__(self, key):
        with self._lock:
            return self._values[key]

    def update(self, **settings):
        settings = validated(settings)
        with self._lock:
            self._values.update(settings)
            return dict(self._values)

    def snapshot(self):
        with self._lock:
            return dict(self._values)

    def take(self, key):
        """Count down a ``*_next`` setting: True (and one less) while it is above zero."""
        with self._lock:
            if self._values[key] <= 0:
                return False
            self._values[key] -= 1
            return True
