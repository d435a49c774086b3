"""``mta serve``: run a node."""

from __future__ import annotations

import typer

from mta.admin.logs import configure_logging
from mta.cli.common import ConfigOption, fail, load
from mta.errors import BudgetExceeded, StoreUnavailable, UnsafeDatabase


def serve(config: ConfigOption = None) -> None:
    """Start a node: check the config and budget, migrate, and serve SMTP."""
    from mta.supervisor import serve as run_serve

    settings = load(config)
    configure_logging(settings.log.level, settings.log.format,
                      addresses=settings.log.addresses, node=settings.node.name)
    try:
        code = run_serve(settings)
    except (BudgetExceeded, UnsafeDatabase) as exc:
        fail(str(exc))
    except StoreUnavailable as exc:
        fail(str(exc).splitlines()[0], code=1)
    except OSError as exc:
        fail(f"cannot start: {exc.strerror or exc}", code=1)
    raise typer.Exit(code)
