"""The ``filedock`` command line.

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

from filedock.config import Limits, parse_quantity
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
    ca = getattr(args, "cacert", None) or os.environ.get("FILEDOCK_CACERT") or conf.get("cacert")
    context = None
    if ca:
        import ssl

        context = ssl.create_default_context(cafile=ca)
    if getattr(args, "tls", False) and url.startswith("http://"):
        url = "https://" + url[len("http://"):]
    return ApiClient(url, token, ssl_context=context, retry=RetryPolicy(attempts=getattr(args, "attempts", 5)),
                     url_source=source)


def emit(args: argparse.Namespace, payload: Any, human: Callable[[Any], None] | None = None) -> None:
    """Print JSON with ``--json`` (or when there is no human form), else the human form."""
    if getattr(args, "json", False) or human is None:
        print(json.dumps(payload, indent=None if getattr(args, "json", False) else 2, sort_keys=True))
    else:
        human(payload)


# ---------------------------------------------------------------- serve and token


def cmd_serve(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from filedock.logs import start_logging
    from filedock.server.service import FiledockServer, ServerOptions, open_store, write_ready_file

    limits = Limits().with_overrides(args.limit or [])
    start_logging(args.log_format)
    # first: the data dir's lock (a second server must not touch the first one's tokens)
    server = FiledockServer(ServerOptions(args.data_dir, args.api_listen, args.data_listen,
                                          args.public_host, limits, args.webhook or [],
                                          args.on_complete or []), reactor)
    token = None
    if args.issue_admin_token:
        store = open_store(args.data_dir)
        store.delete_tokens("serve")
        token = store.create_token("serve")
        store.close()

    def started(result):
        api_url, (host, port, tls) = result
        out = sys.stderr if args.log_format == "json" else sys.stdout  # keep stdout pure JSON lines

        def say(line: str) -> None:
            print(line, file=out, flush=True)
        say(f"filedock API:       {api_url}")
        say(f"filedock data port: {host}:{port}{' (TLS)' if tls else ''}")
        if token and out.isatty():
            say(f"filedock admin token: {token}")
            say(f"  export FILEDOCK_URL={api_url} FILEDOCK_TOKEN={token}")
        elif token:  # a log file or journal is no place for a whole token
            where = "the ready file" if args.ready_file else "nowhere; use 'filedock token create'"
            say(f"filedock admin token: {short_key(token)} (in full: {where})")
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


def cmd_token_create(args: argparse.Namespace) -> int:
    from filedock.server.service import open_store

    store = open_store(args.data_dir)
    token = store.create_token(args.label)
    store.close()
    emit(args, {"token": token, "label": args.label}, lambda p: print(p["token"]))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from filedock.fsck import run_fsck

    fsck, findings = run_fsck(args.data_dir, repair=args.repair, verify=not args.quick)
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
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "name", "state", "files", "created")
    for job in payload["jobs"]:
        files = f"{job.get('files_complete', '?')}/{job.get('files_total', '?')}"
        table.add_row(job["id"], job["name"], job["state"], files, _when(job["created"]))
    Console().print(table)


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
    emit(args, api_client(args).job(args.job))
    return 0


def cmd_job_delete(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    emit(args, api_client(args).request("DELETE", f"/v1/jobs/{quote(args.job, safe='')}"))
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


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="control API URL (FILEDOCK_URL; default %s)" % DEFAULT_URL)
    p.add_argument("--token", help="API token (FILEDOCK_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use https:// for the API and TLS on the data port")
    p.add_argument("--cacert", help="PEM file of trust roots for TLS (FILEDOCK_CACERT)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="filedock", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--data-dir", default="./filedock-data")
    p.add_argument("--api-listen", default="tcp:7480:interface=127.0.0.1", metavar="ENDPOINT")
    p.add_argument("--data-listen", default="tcp:7481:interface=127.0.0.1:backlog=1024", metavar="ENDPOINT")
    p.add_argument("--public-host", help="host name clients should use for the data port")
    p.add_argument("--issue-admin-token", action="store_true",
                   help="replace the token issued at the last start and print a new one")
    p.add_argument("--ready-file", help="write the listening addresses here as JSON once ready")
    p.add_argument("--limit", action="append", metavar="NAME=VALUE",
                   help="override a limit: " + ", ".join(Limits.names()))
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--webhook", action="append", metavar="URL",
                   help="POST each job-completion event here as JSON (at least once, retried)")
    p.add_argument("--on-complete", action="append", metavar="COMMAND",
                   help="run this shell command with each job-completion event as JSON on stdin")
    p.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    p = token.add_parser("create", help="print a new admin token")
    p.add_argument("--data-dir", default="./filedock-data")
    p.add_argument("--label", default="admin")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_create)

    p = sub.add_parser("fsck", help="check that the store and the files on disk agree")
    p.add_argument("--data-dir", default="./filedock-data")
    p.add_argument("--repair", action="store_true", help="fix what is safe (server stopped)")
    p.add_argument("--quick", action="store_true", help="check sizes only, do not re-hash complete files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fsck)

    job = sub.add_parser("job", help="jobs").add_subparsers(dest="action", required=True)
    p = job.add_parser("create", help="create a job")
    p.add_argument("name")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE")
    _client_flags(p)
    p.set_defaults(func=cmd_job_create)
    for name, func, helptext in (("show", cmd_job_show, "a job and its files"),
                                 ("delete", cmd_job_delete, "delete a job and its files")):
        p = job.add_parser(name, help=helptext)
        p.add_argument("job", metavar="JOB", help="job id or name")
        _client_flags(p)
        p.set_defaults(func=func)

    p = sub.add_parser("jobs", help="list jobs")
    _client_flags(p)
    p.set_defaults(func=cmd_jobs)

    file_ = sub.add_parser("file", help="files").add_subparsers(dest="action", required=True)
    p = file_.add_parser("add", help="declare a file of a job")
    p.add_argument("job", metavar="JOB")
    p.add_argument("name", metavar="NAME")
    p.add_argument("size", metavar="SIZE")
    _client_flags(p)
    p.set_defaults(func=cmd_file_add)
    p = file_.add_parser("show", help="a file's state")
    p.add_argument("key", metavar="KEY")
    _client_flags(p)
    p.set_defaults(func=cmd_file_show)

    session = sub.add_parser("session", help="sessions").add_subparsers(dest="action", required=True)
    p = session.add_parser("open", help="open a session for a job")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--ttl", type=float, help="seconds until it expires")
    _client_flags(p)
    p.set_defaults(func=cmd_session_open)
    p = session.add_parser("close", help="close a session")
    p.add_argument("key", metavar="KEY")
    _client_flags(p)
    p.set_defaults(func=cmd_session_close)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: Any) -> None:
    """Commands that live in their own modules (upload, download, status, fsck)."""
    try:
        from filedock.client import commands
    except ImportError:
        return
    commands.add_parsers(sub, _client_flags)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # a command with a list of positionals (download's NAME DEST) takes them around its options too
    # (`download a.wav --job J out/`), which argparse alone does not do for a list
    trailing = getattr(args, "trailing_positionals", None)
    if extra and trailing and not any(item.startswith("-") for item in extra):
        setattr(args, trailing, getattr(args, trailing) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except FiledockError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"code": exc.code_str, "message": exc.message}}))
        print(f"error: {exc.code_str}: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
