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

# flag -> (takes a value, the uv spelling; None: uv has no such flag and needs none)
_FlagTable = dict[str, tuple[bool, str | None]]
_INSTALL_FLAGS: _FlagTable = {
    "-U": (False, "--upgrade"), "--upgrade": (False, "--upgrade"),
    "-r": (True, "-r"), "--requirement": (True, "-r"),
    "-c": (True, "-c"), "--constraint": (True, "-c"),
    "--pre": (False, "--prerelease=allow"),
    # uv's --index-url is the legacy spelling, which UV_DEFAULT_INDEX in the daemon's environment
    # beats; --default-index on the command line beats every environment default.
    "-i": (True, "--default-index"), "--index-url": (True, "--default-index"),
    "--extra-index-url": (True, "--extra-index-url"),
    "--no-deps": (False, "--no-deps"),
    "-e": (True, "-e"), "--editable": (True, "-e"),
    "-q": (False, "--quiet"), "--quiet": (False, "--quiet"),
    "-v": (False, "--verbose"), "--verbose": (False, "--verbose"),
}
_UNINSTALL_FLAGS: _FlagTable = {
    "-y": (False, None), "--yes": (False, None),  # uv never prompts
    "-r": (True, "-r"), "--requirement": (True, "-r"),
    "-q": (False, "--quiet"), "--quiet": (False, "--quiet"),
}
_LIST_FLAGS: _FlagTable = {
    "--format": (True, "--format"), "-o": (False, "--outdated"), "--outdated": (False, "--outdated"),
}
_FREEZE_FLAGS: _FlagTable = {}
_SHOW_FLAGS: _FlagTable = {"-f": (False, "--files"), "--files": (False, "--files")}
FLAGS: dict[str, _FlagTable] = {
    "install": _INSTALL_FLAGS, "uninstall": _UNINSTALL_FLAGS, "list": _LIST_FLAGS,
    "freeze": _FREEZE_FLAGS, "show": _SHOW_FLAGS,
}
_TAKES_PACKAGES = ("install", "uninstall", "show")
_LIST_FORMATS = ("columns", "freeze", "json")
MAX_REQUIREMENT_LENGTH = 4096
MAX_FILE_BYTES = 512 * 1024

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
# Tabs are whitespace; every other control character (and the Unicode line breaks that Python's
# splitlines() knows and uv does not) could make the two read a line differently.
# Lone surrogates (JSON can carry them) cannot be written to a file or an argv.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")


class PipUsageError(Exception):
    """A command the kernel may not run; exit status 2, like pip's own usage errors."""

    exit_status = 2


class PipCommand:
    """A validated command: uv's argv tail, and what the user asked for (to record)."""

    __slots__ = ("files", "local_paths", "packages", "requirements", "subcommand", "uv_flags")

    def __init__(self, subcommand, uv_flags, packages, requirements, files, local_paths):
        self.subcommand = subcommand
        self.uv_flags = uv_flags  # uv's spelling; "@file:N" stands where file N's path goes
        self.packages = packages  # positional arguments; uv gets them after "--"
        self.requirements = requirements  # what the user asked for, to record
        self.files = files  # list of (flag, name) for -r/-c; contents travel separately
        self.local_paths = local_paths  # local paths / editables (refused in system mode)


INDEX_FLAG = "--default-index"


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
            flag, inline_value = [*arg.split("=", 1), None][:2] if arg.startswith("--") else (arg, None)
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
                    assert uv_flag is not None  # every flag that takes a value has a uv spelling
                    _check_url(value, flag)
                    if uv_flag == INDEX_FLAG and INDEX_FLAG in uv_args:
                        raise PipUsageError(TWO_INDEXES)
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
    if not value or len(value) > MAX_REQUIREMENT_LENGTH or _CONTROL.search(value):
        raise PipUsageError("%s %r is empty, too long or has control characters" % (what, value[:80]))
    if "${" in value:
        # uv expands ${NAME} in URLs and requirements from *its* environment: the daemon's,
        # which is not yours (and may hold an index token).
        raise PipUsageError(
            "%s %r uses ${...}: environment variables are not expanded here (uv would read the "
            "daemon's environment, not yours); write the value itself" % (what, value[:200])
        )


# The same checks for a notebook's declared requirements and index URLs (declared.py).
check_text = _check_text


TWO_INDEXES = "-i/--index-url given more than once: name one index, add others with --extra-index-url"


def _check_url(value, flag):
    if not value.startswith(("https://", "http://")):
        raise PipUsageError("%s must be an http(s) URL, got %r" % (flag, value[:200]))


check_url = _check_url


# --- requirement files --------------------------------------------------------------------------

_FILE_INCLUDE = re.compile(r"^\s*(-r|--requirement|-c|--constraint)(\s*=\s*|\s+)(\S+)\s*(?:\s#.*)?$")
# The options a requirements file may carry, with uv's spelling. The daemon takes them out of the
# file and gives them to uv on its command line, checked like the same flags after `pip install`:
# uv then reads nothing but requirement lines from a file, so what it acts on is what was checked.
_FILE_OPTIONS = {
    "-i": "--default-index", "--index-url": "--default-index", "--extra-index-url": "--extra-index-url",
    "--pre": "--prerelease=allow", "--no-deps": "--no-deps",
}
_FILE_OPTIONS_WITH_VALUE = ("-i", "--index-url", "--extra-index-url")
_FILE_OPTION = re.compile(r"^(--?[A-Za-z][A-Za-z-]*)(?:\s*=\s*|\s+|$)(.*)$")
_HASH = re.compile(r"^--hash(?:=|\s+)([A-Za-z0-9]+:[A-Za-z0-9]+)$")
# uv ends a line at \n, \r\n or a lone \r; a backslash right before the break continues it.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FILE_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")
_COMMENT = re.compile(r"(^|\s)#.*$", re.S)


class RequirementsText:
    """A requirements file as the daemon hands it to uv: one requirement per line, no options."""

    __slots__ = ("editables", "local_paths", "options", "requirements")

    def __init__(self):
        self.requirements = []  # (requirement, [hash, ...])
        self.editables = []  # the targets of -e lines
        self.options = []  # uv command-line flags: ("--default-index", url), ("--no-deps",)
        self.local_paths = []  # local paths and "-e TARGET" (refused in system mode)

    def render(self):
        lines = [
            " ".join([requirement] + ["--hash=%s" % h for h in hashes])
            for requirement, hashes in self.requirements
        ]
        lines.extend("-e %s" % target for target in self.editables)
        return "\n".join(lines) + "\n"


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
    for line in _LINE_BREAK.split(text):
        match = _FILE_INCLUDE.match(line)
        if match:
            nested = match.group(3)
            if not os.path.isabs(nested):
                nested = os.path.join(os.path.dirname(os.path.abspath(path)), nested)
            lines.append(read_requirements_file(nested, seen))
        else:
            lines.append(line)
    return "\n".join(lines)


def _logical_lines(text):
    """(number of the first physical line, text) of each line, backslash continuations joined."""
    pending, start = None, 0
    for number, line in enumerate(_LINE_BREAK.split(text), 1):
        if pending is None:
            pending, start = "", number
        if line.endswith("\\") and not line.lstrip().startswith("#"):  # as pip: comments never continue
            pending += line[:-1]
            continue
        yield start, pending + line
        pending = None
    if pending:
        yield start, pending


def parse_requirements_text(text):
    """Daemon side: a requirements file's contents -> RequirementsText. Raises PipUsageError.

    Includes must have been inlined by the client; any left are refused, because the daemon
    would otherwise open that path itself.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise PipUsageError("requirements file is larger than %d bytes" % MAX_FILE_BYTES)
    control = _FILE_CONTROL.search(text)
    if control:
        raise PipUsageError(
            "requirements line %d has a control character (%r)"
            % (len(_LINE_BREAK.findall(text, 0, control.start())) + 1, control.group())
        )
    parsed = RequirementsText()
    for number, logical in _logical_lines(text):
        line = _COMMENT.sub("", logical).strip()
        if not line:
            continue
        where = "requirements line %d" % number
        if line.startswith("-"):
            match = _FILE_OPTION.match(line)
            option, value = (match.group(1), match.group(2).strip()) if match else (line.split()[0], "")
            if option in ("-e", "--editable"):
                _check_text(value, where)
                parsed.editables.append(value)
                parsed.local_paths.append("-e " + value)
            elif option in FORBIDDEN_FLAGS:
                raise PipUsageError("%s: %s is not allowed" % (where, option))
            elif option not in _FILE_OPTIONS:
                raise PipUsageError(
                    "%s: option %s is not supported (only %s, -e and --hash)"
                    % (where, option, ", ".join(_FILE_OPTIONS))
                )
            elif option in _FILE_OPTIONS_WITH_VALUE:
                _check_text(value, "%s: %s" % (where, option))
                _check_url(value, "%s: %s" % (where, option))
                parsed.options.append((_FILE_OPTIONS[option], value))
            elif value:
                raise PipUsageError("%s: %s takes no value" % (where, option))
            else:
                parsed.options.append((_FILE_OPTIONS[option],))
            continue
        requirement, *tail = re.split(r"\s+(?=-)", line)
        hashes = []
        for item in tail:
            match = _HASH.match(item)
            if not match:
                raise PipUsageError("%s: only --hash=ALGORITHM:DIGEST may follow a requirement, got %r"
                                    % (where, item[:80]))
            hashes.append(match.group(1))
        _check_text(requirement, where)
        if looks_like_local_path(requirement):
            parsed.local_paths.append(requirement)
        parsed.requirements.append((requirement, hashes))
    return parsed


def check_requirements_text(text):
    """Daemon side: validate a requirements file; returns the local paths it names."""
    return parse_requirements_text(text).local_paths


def requirement_lines(text):
    """The requirement strings of a requirements file (for the record)."""
    return [requirement for requirement, _ in parse_requirements_text(text).requirements]


# --- what a shared host may install ------------------------------------------------------------

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PEP508_NAME = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[^\]]*\])?\s*")
# What may follow a project name (and extras) in a requirement uv resolves from an index: a
# version specifier, a marker, or nothing. Anything else makes uv read the string as a path.
_AFTER_NAME = re.compile(r"^($|;|\(|[<>=!~])")
_VCS_SCHEMES = ("git+", "hg+", "svn+", "bzr+")

LOCAL_PATH_REFUSED = (
    "installing from a local path (%s) is not possible on a shared host: the daemon never reads "
    "your files. Build a wheel and install it from an index instead."
)
BUILD_REFUSED = (
    "%s needs a build (a source distribution, VCS checkout or editable install): this shared host "
    "installs wheels only, because a build runs the package's own code with the daemon's rights. "
    "Install a version that has a wheel (or a URL ending in .whl), or use your own user-mode uvkerneld."
)


def shared_host_refusal(requirement, editable=False):
    """Why a system-mode daemon must not act on ``requirement`` (None when it may).

    A shared host installs wheels only and never reads a path on a user's behalf; a requirement
    that uv would resolve from an index gets uv's ``--no-build`` instead (see uv.py).
    """
    text = requirement.strip()
    if _SCHEME.match(text) and not looks_like_local_path(text):
        name, url = None, text.split(None, 1)[0]
    else:
        head = _PEP508_NAME.match(text)
        if head is None or looks_like_local_path(text):
            return LOCAL_PATH_REFUSED % requirement
        rest = text[head.end():]
        if not rest.startswith("@"):
            if not _AFTER_NAME.match(rest):
                return LOCAL_PATH_REFUSED % requirement
            return BUILD_REFUSED % head.group(1) if editable else None
        name, url = head.group(1), (rest[1:].split(None, 1) or [""])[0]
    lowered = url.lower()
    if lowered.startswith("file:") or not _SCHEME.match(lowered):
        return LOCAL_PATH_REFUSED % requirement
    if editable or lowered.startswith(_VCS_SCHEMES) or not lowered.startswith(("http://", "https://")):
        return BUILD_REFUSED % (name or url)
    if not re.split(r"[?#]", lowered, maxsplit=1)[0].endswith(".whl"):
        return BUILD_REFUSED % (name or url)
    return None
