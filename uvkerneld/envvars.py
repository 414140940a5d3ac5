"""The names of every environment variable uvkerneld, its kernel stub and uvkernelctl read or set:
the one place they are written (tests/test_facts.py fails on a UVKERNEL name written anywhere else
in the package). The one exception is kernel_extension.py, which runs inside a venv that cannot
import uvkerneld; the test checks its copies against these.

No imports: the kernel stub imports this on every kernel start.
"""

# --- the daemon's settings: UVKERNELD_<SETTING> for every setting of config.py -------------------
SETTING_PREFIX = "UVKERNELD_"


def setting_var(key: str) -> str:
    """The variable that sets the daemon setting ``key`` (``pool_size`` -> ``UVKERNELD_POOL_SIZE``)."""
    return SETTING_PREFIX + key.upper()


# The settings that other code names as well (clients find the daemon by them; kernel.json sets them).
SOCKET = "UVKERNELD_SOCKET"
CACHE_DIR = "UVKERNELD_CACHE_DIR"
VENVS_DIR = "UVKERNELD_VENVS_DIR"
LINK_MODE = "UVKERNELD_LINK_MODE"
MODE = "UVKERNELD_MODE"
CONFIG = "UVKERNELD_CONFIG"  # the config file to read (not a setting: it holds the settings)

# --- read by clients (stub, uvkernelctl, shims) -------------------------------------------------
DAEMON_USER = "UVKERNELD_DAEMON_USER"  # the system daemon's user: a name or a uid
AUTOSTART = "UVKERNELD_AUTOSTART"  # "0": the stub never starts a user-mode daemon itself

# --- the daemon's connection limits (connlimits.py), for tests and unusual hosts -----------------
MAX_CONNECTIONS = "UVKERNELD_MAX_CONNECTIONS"
MAX_CONNECTIONS_PER_UID = "UVKERNELD_MAX_CONNECTIONS_PER_UID"
MAX_KERNELS_PER_UID = "UVKERNELD_MAX_KERNELS_PER_UID"
IDLE_TIMEOUT = "UVKERNELD_IDLE_TIMEOUT"
FRAME_TIMEOUT = "UVKERNELD_FRAME_TIMEOUT"
FRAME_BUFFER_BUDGET = "UVKERNELD_FRAME_BUFFER_BUDGET"

# --- tests only: a file the background bytecode compiler waits for (compilequeue.compile_gate) -----
TEST_COMPILE_GATE = "UVKERNELD_TEST_COMPILE_GATE"

# --- a kernel's: which env it gets (set by the user or a batch tool) ------------------------------
ENV = "UVKERNEL_ENV"  # an env by name
NOTEBOOK = "UVKERNEL_NOTEBOOK"  # the notebook a kernel runs (papermill, nbconvert)
ACQUIRE_TIMEOUT = "UVKERNEL_ACQUIRE_TIMEOUT"  # seconds the stub waits for its env

# --- set by the stub for the kernel and what runs inside it ---------------------------------------
KERNEL_IDENTITY = "UVKERNEL_KERNEL_IDENTITY"  # fingerprint of the identity variables it was given
NOTEBOOK_FILE = "UVKERNEL_NOTEBOOK_FILE"  # the kernel extension reports this notebook's saves
ERROR = "UVKERNEL_ERROR"  # the message the fallback kernel shows

# --- set by the kernel extension for the pip/uv shim it runs ---------------------------------------
CHANGES_FILE = "UVKERNEL_CHANGES_FILE"  # where the shim writes what an install changed
