"""What ``pip``/``uv pip`` commands a notebook may run, validated before anything executes.

Pure and standard library only: the shim in every venv uses it to refuse bad commands at once,
and the daemon uses it again (the daemon never trusts the client). Input is an argv list, never
a shell string, and everything that reaches uv is an argv element, so ``six; rm -rf /tmp/x`` is
just a (bad) requirement string for uv to reject.

``parse_command(argv)`` returns a ``PipCommand`` or raises ``PipUsageError``, whose message is
one line naming what was refused. Requirement files named by ``-r``/``-c`` are *read by the
client, as the user*, and travel as contents; nested ``-r``/``-c`` lines are inlined the same way,
so the daemon never opens a path on a user's behalf.
"""

import os
import re

SUBCOMMANDS = ("install", "uninstall", "list", "freeze", "show")

# Flags that would send packages somewhere other than the notebook's own env.
FORBIDDEN_FLAGS = (
    "--target", "-t", "--prefix", "--python", "-p", "--system", "--user", "--break-system-packages", "--root",
)

# flag -> (takes a value, the uv spelling)
_INSTALL_FLAGS = {
    "-U": (False, "--upgrade"), "--upgrade": (False, "--upgrade"),
    "-r": (True, "-r"), "--requirement": (True, "-r"),
    "-c": (True, "-c"), "--constraint": (True, "-c"),
    "--pre": (False, "--prerelease=allow"),
    "-i": (True, "--index-url"), "--index-url": (True, "--index-url"),
    "--extra-index-url": (True, "--extra-index-url"),
    "--no-deps": (False, "--no-deps"),
    "-e": (True, "-e"), "--editable": (True, "-e"),
    "-q": (False, "--quiet"), "--quiet": (False, "--quiet"),
    "-v": (False, "--verbose"), "--verbose": (False, "--verbose"),
}
_UNINSTALL_FLAGS = {
    "-y": (False, None), "--yes": (False, None),  # uv never prompts
    "-r": (True, "-r"), "--requirement": (True, "-r"),
    "-q": (False, "--quiet"), "--quiet": (False, "--quiet"),
}
_LIST_FLAGS = {
    "--format": (True, "--format"), "-o": (False, "--outdated"), "--outdated": (False, "--outdated"),
}
_FREEZE_FLAGS = {}
_SHOW_FLAGS = {"-f": (False, "--files"), "--files": (False, "--files")}
FLAGS = {
    "install": _INSTALL_FLAGS, "uninstall": _UNINSTALL_FLAGS, "list": _LIST_FLAGS,
    "freeze": _FREEZE_FLAGS, "show": _SHOW_FLAGS,
}
_TAKES_PACKAGES = ("install", "uninstall", "show")
_LIST_FORMATS = ("columns", "freeze", "json")
MAX_REQUIREMENT_LENGTH = 4096
MAX_FILE_BYTES = 512 * 1024

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class PipUsageError(Exception):
    """A command the kernel may not run; exit status 2, like pip's own usage errors."""

    exit_status = 2


class PipCommand:
    """A validated command: uv's argv tail, and what the user asked for (to record)."""

    __slots__ = ("subcommand", "uv_flags", "packages", "requirements", "files", "local_paths")

    def __init__(self, subcommand, uv_flags, packages, requirements, files, local_paths):
        self.subcommand = subcommand
        self.uv_flags = uv_flags  # uv's spelling; "@file:N" stands where file N's path goes
        self.packages = packages  # positional arguments; uv gets them after "--"
        self.requirements = requirements  # what the user asked for, to record
        self.files = files  # list of (flag, name) for -r/-c; contents travel separately
        self.local_paths = local_paths  # local paths / editables (refused in system mode)


def normalize_name(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement):
    """The normalized project name of a requirement string, or None for paths/URLs."""
    if looks_like_local_path(requirement) or "://" in requirement.split("@", 1)[0]:
        return None
    match = _NAME.match(requirement)
    return normalize_name(match.group(1)) if match else None


def looks_like_local_path(requirement):
    text = requirement.strip()
    if text.startswith(("file:", "/", "./", "../", "~", ".")):
        return True
    return text.endswith((".whl", ".tar.gz", ".zip")) and "://" not in text and "@" not in text


def parse_command(argv):
    """Validate ``pip`` argv (after the program name). Raises PipUsageError."""
    if not argv:
        raise PipUsageError("no command given; supported: %s" % ", ".join(SUBCOMMANDS))
    subcommand = argv[0]
    if subcommand.startswith("-"):
        _refuse_flag(subcommand, None)
    if subcommand not in SUBCOMMANDS:
        raise PipUsageError(
            "pip %s is not supported in a uvkerneld kernel; supported: %s"
            % (subcommand, ", ".join(SUBCOMMANDS))
        )
    allowed = FLAGS[subcommand]
    uv_args = []
    packages = []
    requirements = []
    files = []
    local_paths = []
    index = 1
    only_positionals = False
    while index < len(argv):
        arg = argv[index]
        index += 1
        if not only_positionals and arg == "--":
            only_positionals = True
            continue
        if not only_positionals and arg.startswith("-") and arg != "-":
            flag, inline_value = (arg.split("=", 1) + [None])[:2] if arg.startswith("--") else (arg, None)
            if flag not in allowed:
                _refuse_flag(flag, subcommand)
            takes_value, uv_flag = allowed[flag]
            if takes_value:
                if inline_value is None:
                    if index >= len(argv):
                        raise PipUsageError("%s needs a value" % flag)
                    inline_value = argv[index]
                    index += 1
                value = inline_value
                _check_text(value, flag)
                if uv_flag in ("-r", "-c"):
                    files.append((uv_flag, value))
                    uv_args.extend([uv_flag, "@file:%d" % (len(files) - 1)])
                elif uv_flag == "-e":
                    local_paths.append(value)
                    requirements.append("-e " + value)
                    uv_args.extend(["-e", value])
                elif uv_flag == "--format":
                    if value not in _LIST_FORMATS:
                        raise PipUsageError("--format must be one of %s" % ", ".join(_LIST_FORMATS))
                    uv_args.extend([uv_flag, value])
                else:
                    _check_url(value, flag)
                    uv_args.extend([uv_flag, value])
            else:
                if inline_value is not None:
                    raise PipUsageError("%s takes no value" % flag)
                if uv_flag is not None:
                    uv_args.append(uv_flag)
            continue
        if subcommand not in _TAKES_PACKAGES:
            raise PipUsageError("pip %s takes no package arguments (got %r)" % (subcommand, arg))
        _check_text(arg, "requirement")
        if arg.startswith("-"):
            raise PipUsageError("%r is neither a supported flag nor a requirement" % arg)
        if subcommand == "install" and looks_like_local_path(arg):
            local_paths.append(arg)
        requirements.append(arg)
        packages.append(arg)
    if subcommand in ("install", "uninstall") and not requirements and not files:
        raise PipUsageError("pip %s needs at least one package or -r FILE" % subcommand)
    if subcommand == "show" and not requirements:
        raise PipUsageError("pip show needs at least one package name")
    return PipCommand(subcommand, uv_args, packages, requirements, files, local_paths)


def _refuse_flag(flag, subcommand):
    if flag in FORBIDDEN_FLAGS:
        raise PipUsageError(
            "%s is not allowed: packages always go into this notebook's own environment" % flag
        )
    where = "pip %s" % subcommand if subcommand else "pip"
    raise PipUsageError("%s is not supported by %s in a uvkerneld kernel" % (flag, where))


def _check_text(value, what):
    if not value or len(value) > MAX_REQUIREMENT_LENGTH or "\0" in value or "\n" in value:
        raise PipUsageError("%s %r is empty, too long or has control characters" % (what, value[:80]))


def _check_url(value, flag):
    if not value.startswith(("https://", "http://")):
        raise PipUsageError("%s must be an http(s) URL, got %r" % (flag, value[:200]))


# --- requirement files --------------------------------------------------------------------------

_FILE_INCLUDE = re.compile(r"^\s*(-r|--requirement|-c|--constraint)(\s*=\s*|\s+)(\S+)\s*$")
_FILE_OPTIONS = ("--index-url", "-i", "--extra-index-url", "--pre", "--no-deps")


def read_requirements_file(path, _seen=None):
    """Client side: read a -r/-c file as the user, inlining nested -r/-c files."""
    seen = _seen if _seen is not None else set()
    real = os.path.realpath(path)
    if real in seen:
        raise PipUsageError("requirements file %s includes itself" % path)
    seen.add(real)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PipUsageError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    if len(data) > MAX_FILE_BYTES:
        raise PipUsageError("%s is larger than %d bytes" % (path, MAX_FILE_BYTES))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PipUsageError("%s is not UTF-8 text" % path) from None
    lines = []
    for line in text.splitlines():
        match = _FILE_INCLUDE.match(line)
        if match:
            nested = match.group(3)
            if not os.path.isabs(nested):
                nested = os.path.join(os.path.dirname(os.path.abspath(path)), nested)
            lines.append(read_requirements_file(nested, seen))
        else:
            lines.append(line)
    return "\n".join(lines)


def check_requirements_text(text):
    """Daemon side: requirement lines and a few index options only; returns local paths found.

    Includes must have been inlined by the client; any left are refused, because the daemon
    would otherwise open that path itself.
    """
    if len(text.encode("utf-8")) > MAX_FILE_BYTES:
        raise PipUsageError("requirements file is larger than %d bytes" % MAX_FILE_BYTES)
    local_paths = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise PipUsageError("requirements line %d has a NUL byte" % number)
        if line.startswith("-"):
            option = re.split(r"[\s=]", line, maxsplit=1)[0]
            if option in ("-e", "--editable"):
                local_paths.append(line)
                continue
            if option in FORBIDDEN_FLAGS:
                raise PipUsageError("requirements line %d: %s is not allowed" % (number, option))
            if option not in _FILE_OPTIONS:
                raise PipUsageError(
                    "requirements line %d: option %s is not supported (only %s)"
                    % (number, option, ", ".join(_FILE_OPTIONS))
                )
            continue
        if looks_like_local_path(line):
            local_paths.append(line)
    return local_paths


def requirement_lines(text):
    """The requirement strings of a requirements file (for the record)."""
    found = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            found.append(line)
    return found
