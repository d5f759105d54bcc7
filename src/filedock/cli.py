"""The ``filedock`` command line.

Help texts are plain text (no reStructuredText): argparse prints them as they are.

Client commands take ``--server URL --token T`` (or ``FILEDOCK_URL`` /
``FILEDOCK_TOKEN``, or ``url``/``token`` in ``$XDG_CONFIG_HOME/filedock/config.json``)
and ``--json`` for machine-readable output. Exit status: 0 success, 1 failure, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from filedock.client import commands
from filedock.config import BLOBS_HELP, Limits, blobs_url, parse_quantity
from filedock.errors import ErrorCode, FiledockError, short_key

DEFAULT_URL = "http://127.0.0.1:7480/"


def config_path() -> Path:
    """The user's config file: ``$XDG_CONFIG_HOME/filedock/config.json``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "filedock" / "config.json"


def _config() -> dict[str, Any]:
    try:
        return json.loads(config_path().read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise FiledockError(ErrorCode.BAD_REQUEST, f"{config_path()} is not valid JSON: {exc}") from None


def api_client(args: argparse.Namespace):
    """The control-API client the flags, environment and config file describe."""
    from filedock.client.http import ApiClient

    from filedock.client.model import RetryPolicy

    conf = _config()
    url = args.server or os.environ.get("FILEDOCK_URL") or conf.get("url") or DEFAULT_URL
    source = ("--server" if args.server else "FILEDOCK_URL" if os.environ.get("FILEDOCK_URL")
              else f"url in {config_path()}" if conf.get("url") else "the default URL")
    token = args.token or os.environ.get("FILEDOCK_TOKEN") or conf.get("token")
    args.token_source = ("--token" if args.token else "FILEDOCK_TOKEN" if os.environ.get("FILEDOCK_TOKEN")
                         else str(config_path()) if conf.get("token") else None)
    ca = getattr(args, "cacert", None) or os.environ.get("FILEDOCK_CACERT") or conf.get("cacert")
    context = None
    if ca:
        from filedock.client.trust import client_context

        context = client_context(ca)
    if getattr(args, "tls", False) and url.startswith("http://"):
        url = "https://" + url[len("http://"):]
    return ApiClient(url, token, ssl_context=context, retry=RetryPolicy(attempts=getattr(args, "attempts", 5)),
                     url_source=source)


def token_advice(args: argparse.Namespace) -> str:
    """What to tell a CLI user whose token the server refused (or who sent none)."""
    source = getattr(args, "token_source", None)
    fix = ("set FILEDOCK_TOKEN or pass --token (`make run` keeps one in ./filedock-data/admin-token); "
           "`filedock token create --data-dir DIR` makes a new one")
    if source is None:
        return f"no API token: {fix}"
    return f"the server does not accept the token from {source} (revoked, or another server's): {fix}"


def emit(args: argparse.Namespace, payload: Any, human: Callable[[Any], None] | None = None) -> None:
    """Print JSON with ``--json`` (or when there is no human form), else the human form."""
    if getattr(args, "json", False) or human is None:
        print(json.dumps(payload, indent=None if getattr(args, "json", False) else 2, sort_keys=True))
    else:
        human(payload)


# ---------------------------------------------------------------- serve and token


def metadata_url(args: argparse.Namespace) -> str | None:
    """``--metadata``, else ``FILEDOCK_METADATA``, checked: a bad URL is a usage error (exit 2)."""
    from filedock.server.service import METADATA_ENV, check_metadata_url

    try:
        return check_metadata_url(args.metadata or os.environ.get(METADATA_ENV))
    except FiledockError as exc:
        raise ValueError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from filedock.logs import start_logging
    from filedock.server import allocator
    from filedock.server.service import FiledockServer, ServerOptions, first_run_token, write_ready_file

    limits = Limits().with_overrides(args.limit or [])
    metadata = metadata_url(args)
    start_logging(args.log_format)
    tuned = allocator.tune()  # before the first upload's reads (see server/allocator.py)
    if tuned:
        from twisted.logger import Logger
        Logger(namespace="filedock.server").info(
            "allocator: {settings}", settings=" ".join(f"{k}={v}" for k, v in tuned.items()))
    # first: the data dir's lock (a second server must not touch the first one's tokens)
    try:
        server = FiledockServer(ServerOptions(args.data_dir, args.api_listen, args.data_listen,
                                              args.public_host, limits, args.webhook or [],
                                              args.on_complete or [], metadata=metadata,
                                              blobs=blobs_url(args.blobs),
                                              cors_origins=args.cors_origin or [],
                                              public_data_port=args.public_data_port), reactor)
    except FiledockError as exc:
        if exc.code_str not in _BLOBS_ERRORS:
            raise
        print(f"error: {exc.code_str}: {exc.message}", file=sys.stderr)
        return 2
    token = token_file = None
    if args.issue_admin_token:
        token, token_file, _ = first_run_token(args.data_dir, metadata)

    def started(result):
        api_url, (host, port, tls) = result
        out = sys.stderr if args.log_format == "json" else sys.stdout  # keep stdout pure JSON lines
        told = server.info()["data_port"]  # what clients are told, not the bind address
        public, public_port = told["host"], told["port"]
        client_url = _with_host(api_url, args.public_host) if args.public_host else api_url

        def say(line: str) -> None:
            print(line, file=out, flush=True)
        say(f"filedock API:       {client_url}")
        say(f"filedock data port: {_host_port(public, public_port)}{' (TLS)' if tls else ''}")
        if (public, public_port) != (host, port):
            say(f"  (listening on {_host_port(host, port)}; clients are told {_host_port(public, public_port)})")
        say(f"filedock dashboard: {client_url} (sign in with an API token)")
        if token and out.isatty():
            say(f"filedock admin token: {token} (kept in {token_file})")
            say(f"  export FILEDOCK_URL={client_url} FILEDOCK_TOKEN={token}")
        elif token:  # a log file or journal is no place for a whole token: say where it is
            say(f"filedock admin token: {short_key(token)} (in full in {token_file.resolve()}, "
                "readable by its owner only)")
            say(f"  export FILEDOCK_URL={client_url} FILEDOCK_TOKEN=$(cat {token_file.resolve()})")
        if args.ready_file:
            write_ready_file(args.ready_file, {"api_url": api_url, "data_host": host, "data_port": port,
                                               "tls": tls, "token": token, "pid": os.getpid()})

    def failed(failure):
        print(f"error: cannot start: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()
        server.exit_code = 1

    server.exit_code = 0
    reactor.callWhenRunning(lambda: server.start().addCallbacks(started, failed))
    reactor.run()
    return server.exit_code


def _with_host(url: str, host: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=_host_port(host, parts.port)))


def _host_port(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port is not None else host


def cmd_token_create(args: argparse.Namespace) -> int:
    from filedock.server.service import open_store

    store = open_store(args.data_dir, metadata_url(args))
    try:
        job = store.find_job(args.job) if args.job is not None else None
        if args.job is not None and job is None:
            print(f"error: not-found: no job {args.job!r}", file=sys.stderr)
            return 1
        token = store.create_token(args.label, args.scope, job.id if job else None)
    finally:
        store.close()
    emit(args, {"token": token, "label": args.label, "scope": args.scope, "job": job.id if job else None},
         lambda p: print(p["token"]))
    return 0


_BLOBS_ERRORS = (ErrorCode.BAD_BLOBS_URL.value, ErrorCode.BLOB_STORE_UNAVAILABLE.value)
"""A --blobs URL that cannot be used: a configuration error (exit 2), said in one line."""


def cmd_fsck(args: argparse.Namespace) -> int:
    from filedock.fsck import run_fsck

    try:
        fsck, findings = run_fsck(args.data_dir, repair=args.repair, verify=not args.quick,
                                  metadata=metadata_url(args), blobs_url=blobs_url(args.blobs))
    except FiledockError as exc:
        if exc.code_str not in _BLOBS_ERRORS:
            raise
        print(f"error: {exc.code_str}: {exc.message}", file=sys.stderr)
        return 2
    if fsck.server_running:
        print("note: a server is using this data dir; uploads that change while fsck reads may show up as "
              "findings (run it again, or with the server stopped, to be sure)", file=sys.stderr)
    if args.json:
        print(json.dumps({"files": fsck.checked_files, "bytes_verified": fsck.checked_bytes,
                          "findings": [f.to_json() for f in findings]}))
    else:
        for f in findings:
            print(f"{f.kind}: {f.path}: {f.detail}" + (f" [{f.repaired}]" if f.repaired else ""))
        print(f"{fsck.checked_files} files checked, {fsck.checked_bytes} bytes verified, "
              f"{len(findings)} problem(s)" + (", repaired what is safe" if args.repair else ""))
    unrepaired = [f for f in findings if not f.repaired]
    return 1 if unrepaired else 0


# ---------------------------------------------------------------- jobs, files, sessions


def _print_jobs(payload: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = _table("id", "name", "state", "files", "created")
    for job in payload["jobs"]:
        files = f"{job.get('files_complete', '?')}/{job.get('files_total', '?')}"
        table.add_row(job["id"], escape(job["name"]), job["state"], files, _when(job["created"]))
    stdout_console().print(table)


def stdout_console():
    """A rich console on stdout: a terminal's width, or (piped) wide enough that no line wraps."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=100_000)


def _table(*columns: str, title: str | None = None):
    """A rich table whose cells wrap rather than cut (a narrow or piped terminal keeps whole names)."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _print_job(job: dict[str, Any]) -> None:
    """``job show``: the job's facts, then one row per file."""
    from rich.filesize import decimal
    from rich.markup import escape

    files = job.get("files", [])
    received = sum(f["received"] for f in files)
    size = sum(f["size"] for f in files)
    console = stdout_console()
    console.print(f"[bold]job {escape(job['name'])}[/] ({job['id']}): {job['state']}, "
                  f"{job.get('files_complete', 0)}/{job.get('files_total', len(files))} files complete, "
                  f"{decimal(received)} of {decimal(size)}", soft_wrap=True)
    console.print(f"created {_when(job['created'])}, updated {_when(job['updated'])}", soft_wrap=True)
    for key, value in sorted(job.get("metadata", {}).items()):
        console.print(f"  {escape(key)} = {escape(json.dumps(value, ensure_ascii=False))}", soft_wrap=True)
    if not files:
        console.print("no files")
        return
    table = _table("file", "state", "received", "size", "crc32", "digest", "uploaded")
    table.columns[0].min_width = 24  # a narrow terminal folds the digest before the name
    for column in table.columns[1:5]:  # short values: whole on one line
        column.no_wrap = True
    for column in table.columns[2:4]:
        column.justify = "right"
    for f in files:
        table.add_row(escape(f["name"]), f["state"], decimal(f["received"]), decimal(f["size"]),
                      f.get("crc32") or "-", f.get("digest") or "-",
                      _when(f["uploaded_at"]) if f.get("uploaded_at") else "-")
    console.print(table)


def _when(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def _metadata(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FiledockError(ErrorCode.BAD_REQUEST, f"--meta wants KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def cmd_job_create(args: argparse.Namespace) -> int:
    emit(args, api_client(args).create_job(args.name, _metadata(args.meta)))
    return 0


def cmd_job_show(args: argparse.Namespace) -> int:
    emit(args, api_client(args).job(args.job), _print_job)
    return 0


def cmd_job_delete(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from rich.filesize import decimal

    api = api_client(args)
    job = api.job(args.job)
    files = job.get("files", [])
    if files and not args.yes:
        what = (f"job {job['name']!r} ({job['id']}) holds {len(files)} file(s), "
                f"{decimal(sum(f['received'] for f in files))} stored")
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise FiledockError(ErrorCode.BAD_REQUEST, f"{what}: pass --yes to delete it and its files "
                                                       "(nobody at a terminal to ask)")
        print(f"{what}. Delete it and its files for good? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("not deleted", file=sys.stderr)
            return 1
    payload = api.request("DELETE", f"/v1/jobs/{quote(job['id'], safe='')}")
    emit(args, payload, lambda p: print(f"deleted job {job['name']} ({p['deleted']}) and its {len(files)} file(s)"))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    emit(args, api_client(args).get("/v1/jobs"), _print_jobs)
    return 0


def cmd_file_add(args: argparse.Namespace) -> int:
    size = parse_quantity(args.size)
    emit(args, api_client(args).add_file(args.job, args.name, size))
    return 0


def cmd_file_show(args: argparse.Namespace) -> int:
    emit(args, api_client(args).file(args.key))
    return 0


def cmd_session_open(args: argparse.Namespace) -> int:
    emit(args, api_client(args).open_session(args.job, args.ttl))
    return 0


def cmd_session_close(args: argparse.Namespace) -> int:
    emit(args, api_client(args).close_session(args.key))
    return 0


# ---------------------------------------------------------------- parser


class HelpWithDefaults(argparse.HelpFormatter):
    """Help that ends each option's text with its default, unless the text names it already.

    Its width is found as ``shutil.get_terminal_size`` finds it (``COLUMNS``, else the terminal on
    stdout, else 80), without importing ``shutil``: ``argparse`` makes a formatter for every
    ``add_argument``, and ``shutil`` (with the ``bz2`` and ``lzma`` it imports) was 4-5 ms of every
    command's start-up."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width if width is not None else _columns() - 2)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in text and default not in (None, False, [], argparse.SUPPRESS)
                and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _columns() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class CommandParser(argparse.ArgumentParser):
    """The ``filedock`` parser: its subcommands' parsers share the help format."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)


JSON_HELP = "print JSON instead of tables (also accepted before the command: filedock --json ...)"


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="URL",
                   help="control API URL (else FILEDOCK_URL, the config file, or %s)" % DEFAULT_URL)
    p.add_argument("--token", help="API token (else FILEDOCK_TOKEN or the config file; "
                                   "'filedock token create' makes one)")
    p.add_argument("--tls", action="store_true", help="use https:// for the API and TLS on the data port")
    p.add_argument("--cacert", metavar="PEM", help="PEM file of trust roots for TLS (else FILEDOCK_CACERT)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP)


def _metadata_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metadata", metavar="URL",
                   help="the metadata store: sqlite:///path or postgresql://user@host:port/db (else "
                        "FILEDOCK_METADATA, else the data dir's SQLite database)")


def build_parser() -> argparse.ArgumentParser:
    import filedock

    parser = CommandParser(
        prog="filedock", description="Move very large files into jobs on a server: resumable, verified, durable.",
        epilog="Client commands find the server and token in --server/--token, FILEDOCK_URL/FILEDOCK_TOKEN, or "
               "$XDG_CONFIG_HOME/filedock/config.json. 'filedock COMMAND --help' tells more. Exit status: 0 "
               "success, 1 failure, 2 usage.")
    parser.add_argument("--version", action="version", version=f"filedock {filedock.__version__}")
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(func=_help_of(parser))

    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--data-dir", default="./filedock-data", metavar="DIR",
                   help="where files and the metadata database live")
    p.add_argument("--api-listen", default="tcp:7480:interface=127.0.0.1:backlog=1024", metavar="ENDPOINT",
                   help="the control API's Twisted endpoint (ssl:... for TLS)")
    p.add_argument("--data-listen", default="tcp:7481:interface=127.0.0.1:backlog=1024", metavar="ENDPOINT",
                   help="the data port's Twisted endpoint (ssl:... for TLS)")
    p.add_argument("--public-host", metavar="HOST",
                   help="host name clients are told to use for the data port (default: the address it "
                        "listens on; with TLS, the name the certificate carries)")
    p.add_argument("--public-data-port", type=int, metavar="PORT",
                   help="data port clients are told to use (default: the one it listens on; behind a load "
                        "balancer, the balancer's)")
    p.add_argument("--issue-admin-token", action="store_true",
                   help="keep an admin token in DIR/admin-token (owner-only; made if missing or revoked) and "
                        "print it, or where it is when the output is not a terminal")
    p.add_argument("--ready-file", metavar="PATH",
                   help="write the listening addresses (and the token) here as JSON once ready")
    p.add_argument("--limit", action="append", metavar="NAME=VALUE",
                   help="override a limit (docs/deploy.md has each default): " + ", ".join(Limits.names()))
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON")
    p.add_argument("--webhook", action="append", metavar="URL",
                   help="POST each job-completion event here as JSON (at least once, retried)")
    p.add_argument("--blobs", metavar="URL", help=BLOBS_HELP)
    p.add_argument("--on-complete", action="append", metavar="COMMAND",
                   help="run this shell command with each job-completion event as JSON on stdin")
    _metadata_flag(p)
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let browser pages from ORIGIN (e.g. https://app.example.com) upload to /files/ "
                        "(repeat for more; none by default)")
    p.set_defaults(func=cmd_serve)

    token = _group(sub, "token", "API tokens")
    p = token.add_parser("create", help="print a new token (admin unless --scope says otherwise)")
    p.add_argument("--data-dir", default="./filedock-data", metavar="DIR", help="the server's data dir")
    p.add_argument("--label", default="admin", help="a name for the token, kept with it")
    p.add_argument("--scope", choices=["admin", "upload", "read"], default="admin",
                   help="admin: everything; upload: declare, upload, resume and check files; "
                        "read: list, show and download")
    p.add_argument("--job", metavar="JOB", help="the token reaches this job (id or name) only")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP)
    _metadata_flag(p)
    p.set_defaults(func=cmd_token_create)

    p = sub.add_parser("fsck", help="check that the store and the files on disk agree")
    p.add_argument("--data-dir", default="./filedock-data", metavar="DIR", help="the server's data dir")
    p.add_argument("--repair", action="store_true", help="fix what is safe (server stopped)")
    p.add_argument("--quick", action="store_true", help="check sizes only, do not re-hash complete files")
    p.add_argument("--blobs", metavar="URL", help=BLOBS_HELP)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP)
    _metadata_flag(p)
    p.set_defaults(func=cmd_fsck)

    job = _group(sub, "job", "jobs: create, show, delete")
    p = job.add_parser("create", help="create a job")
    p.add_argument("name", help="the job's name")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="a metadata field (repeat for more)")
    _client_flags(p)
    p.set_defaults(func=cmd_job_create)
    for name, func, helptext in (("show", cmd_job_show, "a job and its files"),
                                 ("delete", cmd_job_delete, "delete a job and its files")):
        p = job.add_parser(name, help=helptext)
        p.add_argument("job", metavar="JOB", help="job id or name")
        if name == "delete":
            p.add_argument("--yes", action="store_true",
                           help="do not ask before deleting a job that holds files (needed when not at a terminal)")
        _client_flags(p)
        p.set_defaults(func=func)

    p = sub.add_parser("jobs", help="list jobs")
    _client_flags(p)
    p.set_defaults(func=cmd_jobs)

    file_ = _group(sub, "file", "files: add, show")
    p = file_.add_parser("add", help="declare a file of a job")
    p.add_argument("job", metavar="JOB", help="job id or name")
    p.add_argument("name", metavar="NAME", help="the file's name in the job")
    p.add_argument("size", metavar="SIZE", help="its size in bytes (1K, 2M, 3G: binary multiples)")
    _client_flags(p)
    p.set_defaults(func=cmd_file_add)
    p = file_.add_parser("show", help="a file's state")
    p.add_argument("key", metavar="KEY", help="the file's key")
    _client_flags(p)
    p.set_defaults(func=cmd_file_show)

    session = _group(sub, "session", "sessions for the data port: open, close")
    p = session.add_parser("open", help="open a session for a job")
    p.add_argument("job", metavar="JOB", help="job id or name")
    p.add_argument("--ttl", type=float, metavar="S",
                   help="seconds until it expires (default: the server's session_ttl limit)")
    _client_flags(p)
    p.set_defaults(func=cmd_session_open)
    p = session.add_parser("close", help="close a session")
    p.add_argument("key", metavar="KEY", help="the session's key")
    _client_flags(p)
    p.set_defaults(func=cmd_session_close)

    _add_optional_commands(sub)
    return parser


def _help_of(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """A command that lists what ``parser`` offers (``filedock`` or ``filedock job`` alone)."""
    def show(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    return show


def _group(sub: Any, name: str, helptext: str) -> Any:
    """A command with subcommands (``filedock job ...``); alone, it lists them."""
    parser = sub.add_parser(name, help=helptext, description=helptext)
    parser.set_defaults(func=_help_of(parser))
    return parser.add_subparsers(dest="action", metavar="ACTION")


def _add_optional_commands(sub: Any) -> None:
    """Commands that live in their own modules (upload, download, status), given what they need from here."""
    commands.add_parsers(sub, _client_flags, commands.CliServices(api_client, stdout_console, emit))


def main(argv: list[str] | None = None) -> int:
    """Run one ``filedock`` command; its exit status."""
    return _run(argv)[0]


def entry() -> None:
    """The ``filedock`` program (and ``python -m filedock``): ``main()``, then exit.

    A command that asks for it (``upload``: ``args.quick_exit``) leaves without the interpreter's
    finalization (tearing down some hundred modules: about 25 ms of CPU here, 2% of a 1 GiB upload on
    loopback) once its output is flushed and no thread but this one is still running.
    """
    import gc

    gc.disable()  # as in __main__ (the console script imported this module with it on); _run enables it
    code, args = _run(None, gc_on=True)
    if getattr(args, "quick_exit", False):
        _quick_exit(code)
    sys.exit(code)


def _quick_exit(code: int) -> None:
    """``os._exit(code)`` after flushing what finalization would flush; returns if that is not safe."""
    import threading

    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        return  # a thread finalization would wait for
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return  # e.g. a closed pipe: the normal exit reports it as usual
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(code)


def _run(argv: list[str] | None, gc_on: bool = False) -> tuple[int, argparse.Namespace | None]:
    """``main``; with ``gc_on`` the cyclic garbage collector is enabled before the command runs, or by
    the command itself once its imports are done (one whose defaults say ``enables_gc``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # a command with a list of positionals (download's NAME DEST) takes them around its options too
    # (`download a.wav --job J out/`), which argparse alone does not do for a list
    trailing = getattr(args, "trailing_positionals", None)
    if extra and trailing and not any(item.startswith("-") for item in extra):
        setattr(args, trailing, getattr(args, trailing) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if gc_on and not getattr(args, "enables_gc", False):
        import gc

        gc.enable()
    try:
        return args.func(args) or 0, args
    except FiledockError as exc:
        if exc.code_str == ErrorCode.UNAUTHORIZED.value and hasattr(args, "token_source"):
            exc = FiledockError(exc.code, token_advice(args))
        if getattr(args, "json", False):
            print(json.dumps({"error": {"code": exc.code_str, "message": exc.message}}))
        print(f"error: {exc.code_str}: {exc.message}", file=sys.stderr)
        return 1, args
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, args
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130, None


if __name__ == "__main__":
    entry()
