"""The reference DAGs in the Airflow UI (``airflow standalone``) against embedded case-study databases.

    python -m sync_dev.standalone          # or: make ui

Starts (or restarts) an embedded PostgreSQL whose data persists in ``--data`` (default
``~/.cache/airflow_sync_provider/casestudies``), creates the case-study databases the first time
and seeds them, points the Airflow connections and the tokenisation variable at them (as
environment variables of this process), and runs ``airflow standalone`` with ``dags/`` as the DAG
folder.  Open http://localhost:8080 (the admin password is printed by Airflow), unpause
``inventory_sync`` and ``bank_customer_sync``, and trigger ``case_study_data`` with
``{"action": "changes"}`` to make something happen.  Ctrl-C stops Airflow and the database.

The UI port: ``--ui-port 8081``, or ``SYNC_UI_PORT=8081``, or ``make ui UI_PORT=8081``.  It is
passed to ``airflow standalone`` as ``AIRFLOW__API__PORT`` (the api-server's ``[api] port``), and
``AIRFLOW__CORE__EXECUTION_API_SERVER_URL`` follows it: task processes reach the api-server there,
and its default assumes port 8080.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from case_studies import bank, databases, inventory
from sync_dev import DAGS_FOLDER
from sync_dev.local_postgres import free_port, init_server

DEFAULT_DATA = Path.home() / ".cache" / "airflow_sync_provider" / "casestudies"
DEFAULT_UI_PORT = 8080


def tcp_port(text: str) -> int:
    """An argparse type: a TCP port number."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return port


def port_in_use(port: int) -> bool:
    """Whether a listening socket holds ``port`` (the api-server binds ``[api] host``, 0.0.0.0 by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def ui_environment(port: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The Airflow settings that put the api-server (UI) on ``port``.

    Task processes talk to the api-server's execution API; without ``[api] base_url`` its URL
    defaults to port 8080, so it follows the port unless the caller configured either.
    """
    settings = {"AIRFLOW__API__PORT": str(port)}
    if not {"AIRFLOW__API__BASE_URL", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"} & set(environ):
        settings["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"http://localhost:{port}/execution/"
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the embedded databases persist")
    parser.add_argument("--port", type=int, default=None, help="PostgreSQL port (default: a free one)")
    parser.add_argument(
        "--ui-port",
        type=tcp_port,
        default=os.environ.get("SYNC_UI_PORT") or os.environ.get("AIRFLOW__API__PORT") or str(DEFAULT_UI_PORT),
        help=f"port of the Airflow UI (api-server) (default: $SYNC_UI_PORT, $AIRFLOW__API__PORT, {DEFAULT_UI_PORT})",
    )
    parser.add_argument(
        "--airflow-home", type=Path, default=Path(os.environ.get("AIRFLOW_HOME", Path.cwd() / ".airflow"))
    )
    parser.add_argument("--print-env", action="store_true", help="start the databases, print the variables, exit")
    parser.add_argument("--stop", action="store_true", help="stop the databases a --print-env run left running")
    args = parser.parse_args(argv)

    pid_file = args.data / "pg" / "postmaster.pid"
    if args.stop or pid_file.exists():
        port = int(pid_file.read_text().splitlines()[3]) if pid_file.exists() else 0
        init_server(args.data / "pg", port).stop()
        if args.stop:
            return 0
    if not args.print_env and port_in_use(args.ui_port):
        print(
            f"port {args.ui_port} is in use (another Airflow?); pick another one for the UI: "
            f"make ui UI_PORT=8081 (or --ui-port 8081, or SYNC_UI_PORT=8081)",
            file=sys.stderr,
        )
        return 2
    server = init_server(args.data / "pg", args.port or free_port())
    server.start()
    try:
        with server.connect() as admin:
            created = databases.create_databases(admin, recreate=False)
        uris = databases.connection_uris("127.0.0.1", server.port)
        if created:
            print(f"created databases: {', '.join(created)}; seeding them")
            if not databases.is_seeded(uris["warehouse_a"], "public.stock"):
                inventory.seed(uris)
            if not databases.is_seeded(uris[bank.SOURCE], "public.customers"):
                bank.seed(uris[bank.SOURCE])
        environment = {
            **databases.airflow_environment(uris),
            "AIRFLOW_VAR_SYNC_TOKEN_KEY": os.environ.get("AIRFLOW_VAR_SYNC_TOKEN_KEY", "local-demo-token-key"),
            "AIRFLOW_HOME": str(args.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # Browse -> Sync status reads the case studies' targets
            "AIRFLOW__SYNC__STATUS_CONN_IDS": ",".join((databases.INVENTORY_TARGET, *databases.BANK_TARGETS)),
            **ui_environment(args.ui_port),
        }
        if args.print_env:
            for name, value in environment.items():
                print(f"export {name}='{value}'")
            print(
                f"# PostgreSQL is left running on port {server.port}; stop it with: "
                f"{server.bindir / 'pg_ctl'} -D {server.datadir} stop"
            )
            return 0
        print(
            f"case-study databases on 127.0.0.1:{server.port}; starting airflow standalone, "
            f"UI on http://localhost:{args.ui_port} (Ctrl-C to stop)"
        )
        airflow = shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"
        try:
            return subprocess.call([airflow, "standalone"], env={**os.environ, **environment})
        except KeyboardInterrupt:
            return 0
    finally:
        if not args.print_env:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
