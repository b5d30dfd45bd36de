"""The `medbridge` command: run, send-demo, token, users add, db upgrade/current/revision, kb ingest,
train-demo-model, eval."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path

from integration.app.settings import Settings, get_settings
from integration.events.supervision import rate_limit_logger
from integration.observability import logs, tracing
from integration.observability.logs import LogFormat

log = logging.getLogger("medbridge")


def _offline_models() -> None:
    # No model hub at run time: every model is loaded from a local path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


def _configure_logging(verbose: bool, log_format: LogFormat) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logs.install(log_format, level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    # third-party loggers that could print identifiers or request lines stay quiet
    # (highdicom logs "copy ... from dataset <SOP Instance UID>" at INFO while building an export)
    for noisy in ("pynetdicom", "aiokafka", "httpx", "chromadb", "uvicorn.access", "sentence_transformers",
                  "highdicom", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # psycopg warns with the server's error text (which can quote key values) when a pipeline fails while
    # another error is raised; MedBridge reports the error itself, without values
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    # pydicom warns about a malformed value by quoting it ("Invalid value for VR UI: '<the UID>'"), as a
    # log record and as a Python warning: the value is the data set's, so neither may reach the log
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"Invalid value for VR", category=UserWarning)
    # a dead broker makes aiokafka log every reconnection attempt (200-250 lines a second): one per 30 s
    import aiokafka  # noqa: F401 - its modules make their loggers at import; the filter goes on each

    rate_limit_logger("aiokafka")


def ensure_demo_model(settings: Settings) -> None:
    """Train the demo CNN on first run when the configured weights are the (missing) demo weights."""
    path = settings.imaging_model_path
    if path.exists() or settings.imaging_model is not None or "imaging" not in settings.enabled_workers:
        return
    log.info("no imaging weights at %s: training the demo model (a few minutes, once)", path)
    from inference.imaging.train import train_demo_model

    train_demo_model(path, log=log.info)


async def _serve(settings: Settings) -> None:
    from integration.app.runtime import Runtime

    runtime = Runtime(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runtime.start()
        print(
            f"MedBridge is up. DICOM {settings.dicom_ae_title}@{settings.dicom_host}:{settings.dicom_port}  "
            f"API http://{settings.http_host}:{runtime.http_port}/docs  "
            f"viewer http://{settings.viewer_host}:{settings.viewer_port}  (Ctrl-C stops)",
            flush=True,
        )
        await stop.wait()
        log.info("stopping")
    finally:
        await runtime.stop()


def cmd_run(args: argparse.Namespace) -> int:
    settings = get_settings()
    ensure_demo_model(settings)
    # once per process, here rather than in the Runtime: a provider is process-wide (tests start many runtimes)
    stop_tracing = tracing.configure("medbridge", settings.trace_file)
    try:
        asyncio.run(_serve(settings))
    finally:
        stop_tracing()  # flushes the spans still batched for the exporter
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from inference.imaging.train import train_demo_model

    settings = get_settings()
    out = Path(args.output) if args.output else settings.imaging_model_path
    meta = train_demo_model(out, quick=args.quick, log=log.info)
    print(f"MONAI bundle written to {out}: {meta.get('medbridge', {}).get('metrics')}")
    return 0


def cmd_kb_ingest(args: argparse.Namespace) -> int:
    from inference.clinical.worker import open_knowledge_base
    from knowledge.documents.ingest import ingest_documents
    from knowledge.ingest import ingest_default_corpus

    settings = get_settings()
    kb = open_knowledge_base(settings.chroma_dir, settings.chroma_url)
    if not args.paths:
        added = ingest_default_corpus(kb)
        print(f"knowledge base holds {kb.count()} passages ({added} upserted)")
        return 0
    report = ingest_documents(kb, [Path(p) for p in args.paths], sync=args.sync, progress=not args.no_progress)
    print(
        f"{report.files_read} documents read, {report.chunks} chunks ({report.chunks_written} written, "
        f"{report.chunks_removed} removed, {report.files_removed} documents gone); "
        f"knowledge base holds {kb.count()} passages"
    )
    if report.skipped:
        print(f"{len(report.skipped)} files skipped:", file=sys.stderr)
        for skipped in report.skipped:
            print(f"  {skipped.path}: {skipped.reason}", file=sys.stderr)
        return 1
    return 0


def cmd_send_demo(args: argparse.Namespace) -> int:
    from integration.app.demo import run_demo

    settings = get_settings()
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "") else settings.http_host
    api = args.api or f"http://{host}:{settings.http_port}"
    token = args.token or os.environ.get("MEDBRIDGE_TOKEN") or _embedded_token(
        settings, ["integration"], "medbridge-send-demo", "send-demo", 3600)
    return run_demo(api, args.dicom_host, settings.dicom_port, settings.dicom_ae_title, token, timeout=args.timeout)


def _embedded_token(settings: Settings, roles: list[str], subject: str, name: str | None, ttl: int) -> str:
    from integration.auth.embedded import EmbeddedIssuerRefused, embedded_token

    try:
        return embedded_token(settings, roles, subject, name, ttl)
    except EmbeddedIssuerRefused as exc:
        raise SystemExit(str(exc)) from exc


def _duration(text: str) -> int:
    """Seconds in ``3600``, ``90m``, ``12h`` or ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    if not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError("a lifetime is a positive number with s, m, h or d (e.g. 12h)")
    return int(number) * units[unit]


def cmd_token(args: argparse.Namespace) -> int:
    settings = get_settings()
    subject = args.subject or args.name
    try:
        token = _embedded_token(settings, args.role, subject, args.name, args.ttl)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(token)  # alone on stdout, so that TOKEN=$(medbridge token ...) works
    return 0


def cmd_users_add(args: argparse.Namespace) -> int:
    import getpass

    from integration.auth.users import UserError, add_user
    from integration.db.store import Store

    settings = get_settings()
    if settings.oidc_issuer:
        raise SystemExit(f"MEDBRIDGE_OIDC_ISSUER is set: people log in at {settings.oidc_issuer}; add them there")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise SystemExit("the passwords differ; nothing was changed")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.effective_database_url)
    store.start()
    try:
        add_user(store, args.name, password, args.role, args.display_name)
    except UserError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        store.stop()
    print(f"user {args.name} ({', '.join(args.role)}) can log in to the viewer", file=sys.stderr)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """``db upgrade`` / ``db current`` on the configured database; ``db revision`` diffs integration.db.tables
    against a scratch SQLite database at head (or ``--database-url``) and writes the new migration."""
    from integration.db import schema

    try:
        return _db(args)
    except schema.SchemaUpgradeError as exc:
        raise SystemExit(str(exc)) from None


def _db(args: argparse.Namespace) -> int:
    import tempfile

    from sqlalchemy import create_engine

    from integration.db import schema

    if args.db_command == "revision" and not args.database_url:
        with tempfile.TemporaryDirectory() as scratch:
            engine = create_engine(f"sqlite:///{scratch}/scratch.db")
            try:
                print(schema.make_revision(engine, args.message))
            finally:
                engine.dispose()
        return 0
    settings = get_settings()
    if not args.database_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(args.database_url or settings.effective_database_url)
    try:
        if args.db_command == "revision":
            print(schema.make_revision(engine, args.message))
        elif args.db_command == "upgrade":
            schema.upgrade(engine)
            print(f"at {schema.current_revision(engine)}")
        else:
            current, head = schema.current_revision(engine), schema.head_revision()
            print(f"{current or 'no revision (a new database, or one from before migrations)'}"
                  f"{'' if current == head else f' (head is {head}: medbridge db upgrade, or start MedBridge)'}")
    finally:
        engine.dispose()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Offline quality measurements on the Open-i reports: prints the Markdown table; ``--output`` also writes it."""
    from knowledge.evaluation.openi import OpenIError
    from knowledge.evaluation.report import EvalOptions, run_evaluation
    from knowledge.generation.backends import GeneratorConfig
    from knowledge.generation.protocol import LLMError

    settings = get_settings()
    if bool(args.base_url) != bool(args.model):
        raise SystemExit("medbridge eval: --base-url and --model go together (the server's URL and its model's name)")
    # the clinical worker's server settings (inference.clinical.worker.generator_config), without importing the
    # worker and the service stack behind it; --base-url/--model name another server
    server = GeneratorConfig(
        base_url=args.base_url or settings.llm_base_url,
        model=args.model or (str(settings.llm_model) if settings.llm_base_url and settings.llm_model else None),
        api_key=settings.llm_api_key.get_secret_value(), concurrency=settings.llm_concurrency,
        timeout_seconds=settings.llm_timeout_seconds, max_retries=settings.llm_max_retries,
        context_tokens=settings.llm_context_tokens, tokenizer=settings.llm_tokenizer,
    )
    backend = args.backend or ("both" if server.base_url else "in-process")
    if backend != "in-process" and not server.base_url:
        raise SystemExit(f"medbridge eval: --backend {backend} needs a server: set MEDBRIDGE_LLM_BASE_URL and "
                         "MEDBRIDGE_LLM_MODEL, or pass --base-url URL --model NAME")
    options = EvalOptions(
        limit=args.limit, k=args.k, max_new_tokens=args.max_new_tokens, kb_limit=args.kb_limit,
        # with a server configured, MEDBRIDGE_LLM_MODEL names the served model: in process runs the demo model
        llm_model=None if settings.llm_base_url else settings.llm_model,
        models_dir=Path(args.models_dir) if args.models_dir else settings.models_dir,
        threads=args.threads, retrieval_queries=args.retrieval_queries,
        backends=("in-process", "server") if backend == "both" else (backend,),
        server=server if server.base_url else None,
        cache_dir=None if args.no_cache else Path(args.cache_dir),
    )
    try:
        markdown = run_evaluation(options, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (OpenIError, LLMError, ValueError) as exc:
        raise SystemExit(f"medbridge eval: {exc}") from None
    print(markdown)
    if args.output:
        Path(args.output).write_text(markdown, encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    _offline_models()
    parser = argparse.ArgumentParser(prog="medbridge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the whole stack in the foreground").set_defaults(func=cmd_run)
    demo = sub.add_parser("send-demo", help="send a demo study and patient to a running stack")
    demo.add_argument("--api", help="base URL of the HTTP API (default from settings)")
    demo.add_argument("--dicom-host", default="127.0.0.1")
    demo.add_argument("--timeout", type=float, default=300)
    demo.add_argument("--token", help="bearer token (default: MEDBRIDGE_TOKEN, else one from the embedded issuer)")
    demo.set_defaults(func=cmd_send_demo)
    from integration.auth.principal import ROLES

    token = sub.add_parser("token", help="print a bearer token from the embedded issuer (nothing else on stdout)")
    token.add_argument("--role", action="append", required=True, choices=ROLES, help="repeat for several roles")
    token.add_argument("--name", required=True, help="who or what the token is for (shown in reviews and audit)")
    token.add_argument("--subject", help="the token's sub (default: the name)")
    token.add_argument("--ttl", type=_duration, default=3600, help="lifetime: 3600, 90m, 12h, 7d (default 1h)")
    token.set_defaults(func=cmd_token)
    users = sub.add_parser("users", help="local users of the embedded identity mode")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="add a user (or set a user's password and roles)")
    add.add_argument("name")
    add.add_argument("--role", action="append", required=True, choices=ROLES, help="repeat for several roles")
    add.add_argument("--display-name", help="the name shown on reviews (default: the user name)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.set_defaults(func=cmd_users_add)
    db = sub.add_parser("db", help="schema migrations (Alembic; MedBridge also upgrades at start)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, what in (("upgrade", "bring the database to this version's schema"),
                       ("current", "print the database's schema revision")):
        cmd = db_sub.add_parser(name, help=what)
        cmd.add_argument("--database-url", help="default: the configured database (DATABASE_URL)")
        cmd.set_defaults(func=cmd_db)
    revision = db_sub.add_parser("revision", help="write a migration for a change to integration/db/tables.py")
    revision.add_argument("-m", "--message", required=True, help="what the change is, e.g. 'add review claims'")
    revision.add_argument("--database-url", help="diff against this database at head (default: a scratch SQLite)")
    revision.set_defaults(func=cmd_db)
    kb = sub.add_parser("kb", help="knowledge base")
    kb_sub = kb.add_subparsers(dest="kb_command", required=True)
    ingest = kb_sub.add_parser(
        "ingest",
        help="ingest documents (Markdown, HTML, PDF, text, FHIR DocumentReference JSON) or, with no PATH, "
        "the shipped corpus; idempotent. Exits 1 when some files were skipped (named on stderr)",
    )
    ingest.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (walked recursively)")
    ingest.add_argument("--sync", action="store_true",
                        help="also remove the documents ingested from under PATH whose files are gone")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")
    ingest.set_defaults(func=cmd_kb_ingest)
    train = sub.add_parser("train-demo-model", help="train the demo imaging CNN")
    train.add_argument("--output", help="bundle folder to write (default: MEDBRIDGE_IMAGING_MODEL or var/models)")
    train.add_argument("--quick", action="store_true", help="a short run, for tests")
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="measure drafting and citation quality offline (Open-i reports)")
    ev.add_argument("--limit", type=int, default=40, help="reports of the fixed 200-report subset (200: all)")
    ev.add_argument("--k", type=int, default=3, help="passages (similar reports) given to the model")
    ev.add_argument("--max-new-tokens", type=int, default=40, help="length limit of each drafted impression")
    ev.add_argument("--kb-limit", type=int, help="keep only this many knowledge-base reports (quick runs)")
    ev.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ev.add_argument("--models-dir", help="where the demo LLM is converted (default: the settings' models folder)")
    ev.add_argument("--retrieval-queries", type=int, default=300,
                    help="queries of the retrieval recall@5 section (0 leaves it out)")
    ev.add_argument("--backend", choices=("in-process", "server", "both"),
                    help="which models draft (default: in-process, and the server too when one is configured)")
    ev.add_argument("--base-url", help="an OpenAI-compatible server to draft through, e.g. http://127.0.0.1:8765/v1 "
                    "(default: MEDBRIDGE_LLM_BASE_URL)")
    ev.add_argument("--model", help="the served model's name, with --base-url (default: MEDBRIDGE_LLM_MODEL)")
    ev.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "medbridge-eval"),
                    help="where the reports' MiniLM vectors are kept between runs (default: $TMPDIR/medbridge-eval)")
    ev.add_argument("--no-cache", action="store_true", help="embed every report again and keep nothing (a cold run)")
    ev.add_argument("--output", help="also write the Markdown to this file")
    ev.set_defaults(func=cmd_eval)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, get_settings().log_format)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
