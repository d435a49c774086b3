"""``mta queue retry | hold | release | delete``: postsuper for this node, audited.

Each takes delivery ids, queue ids (every delivery of the message with work left), or a
filter (``--state``, ``--destination``, ``--older-than``, ``--sender``). A filter shows
how many deliveries it matches and asks before acting, unless ``--yes``; the action's
reason then names it (``abuse check (filter: --destination example.com)``), in the audit
record, the hold reason and each delivery's timeline.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from mta.cli.common import ConfigOption, console, fail, load, operator_name
from mta.cli.queue_common import (
    DestinationOption,
    OlderOption,
    OperatorOption,
    ReasonOption,
    SenderOption,
    StateOption,
    filter_text,
    make_filter,
    run_store,
)
from mta.delivery.dsn import FailedRecipient, build_dsn
from mta.delivery.settlement import DSN_HEADERS_MAX_BYTES
from mta.queue import NewMessage, Store
from mta.queue.ids import new_message_id, parse_queue_id, queue_id
from mta.queue.records import ALL_STATES, PENDING_STATES, DeletedMessage

TargetsArgument = Annotated[list[str] | None, typer.Argument(
    help="Delivery ids or queue ids (all of a message's deliveries); or give a filter.",
    show_default=False)]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Act on a filter's matches "
                                         "without asking.")]
#: At most this many deliveries are matched by one filter run.
FILTER_MAX = 1_000_000
#: Acts on delivery ids with the reason to record (the operator's, and the filter).
Act = Callable[[Store, list[int], str], Awaitable[set[int]]]


def _targets(targets: Sequence[str]) -> tuple[list[int], list[uuid.UUID]]:
    """Delivery ids and message ids among ``targets``; exit 2 on anything else."""
    ids: list[int] = []
    messages: list[uuid.UUID] = []
    for target in targets:
        if target.isdigit() and len(target) < 26:
            ids.append(int(target))
            continue
        try:
            messages.append(parse_queue_id(target))
        except ValueError:
            fail(f"not a delivery id nor a queue id: {target!r}")
    return ids, messages


def filtered_reason(reason: str, selection: str) -> str:
    """``reason`` as a filter's action records it: with the filter that chose."""
    return f"{reason} (filter: {selection})"


def act_on(config: Path | None, targets: Sequence[str] | None, sources: Sequence[str],
           verb: str, act: Act, *, reason: str, state: str | None, destination: str | None,
           older_than: str | None, sender: str | None, yes: bool,
           hint: str = "") -> None:
    """Resolve targets or a filter to delivery ids, confirm a filter, act (with
    ``reason``; a filter's names the filter), and report what changed and what was left
    (exit 2 when something was left)."""
    filtered = any(v is not None for v in (state, destination, older_than, sender))
    if filtered and targets:
        fail("give ids or a filter, not both")
    if not filtered and not targets:
        fail("give delivery ids, queue ids or a filter (--state, --destination, "
             "--older-than, --sender)")
    if state is not None and state in ALL_STATES and state not in sources:
        fail(f"only {', '.join(sources)} deliveries can be {verb}{hint}")
    if filtered:
        chosen = make_filter(state, destination, older_than, sender, default=sources,
                             allowed=sources)
        ids = [d.id for d in run_store(config, lambda s: s.filter_deliveries(chosen,
                                                                             FILTER_MAX))]
        console.print(f"{len(ids)} deliveries match ({', '.join(chosen.states)})")
        if not ids:
            return
        if not yes and not typer.confirm(f"{verb} {len(ids)} deliveries?", default=False):
            fail("nothing changed", code=1)
        reason = filtered_reason(reason, filter_text(state, destination, older_than, sender))
    else:
        ids, messages = _targets(targets or [])

        async def resolve(store: Store) -> list[int]:
            found = await store.deliveries_of_messages(messages, PENDING_STATES) \
                if messages else []
            return sorted(set(ids) | set(found))

        ids = run_store(config, resolve) if messages else ids

    async def apply(store: Store) -> tuple[set[int], dict[int, str]]:
        changed = await act(store, ids, reason)
        return changed, await store.delivery_states(sorted(set(ids) - changed))

    changed, left = run_store(config, apply)
    if changed:
        console.print(f"{verb}: {', '.join(str(i) for i in sorted(changed))}")
    if set(ids) - changed:
        fail("left unchanged: " + ", ".join(f"{i} ({left.get(i, 'no such delivery')})"
                                            for i in sorted(set(ids) - changed)))


def retry(targets: TargetsArgument = None, reason: ReasonOption = "retry now",
          state: StateOption = None, destination: DestinationOption = None,
          older_than: OlderOption = None, sender: SenderOption = None, yes: YesOption = False,
          config: ConfigOption = None, operator: OperatorOption = None) -> None:
    """Make queued or deferred deliveries due now (``resend`` is for uncertain ones)."""
    who = operator_name(operator)
    act_on(config, targets, ("queued", "deferred"), "due now",
           lambda store, ids, why: store.retry_now(ids, who, why), reason=reason, state=state,
           destination=destination, older_than=older_than, sender=sender, yes=yes)


def hold(reason: ReasonOption, targets: TargetsArgument = None, state: StateOption = None,
         destination: DestinationOption = None, older_than: OlderOption = None,
         sender: SenderOption = None, yes: YesOption = False, config: ConfigOption = None,
         operator: OperatorOption = None) -> None:
    """Hold queued or deferred deliveries: nothing sends them until ``release``."""
    who = operator_name(operator)
    act_on(config, targets, ("queued", "deferred"), "held",
           lambda store, ids, why: store.hold(ids, who, why), reason=reason, state=state,
           destination=destination, older_than=older_than, sender=sender, yes=yes)


def release(reason: ReasonOption, targets: TargetsArgument = None, state: StateOption = None,
            destination: DestinationOption = None, older_than: OlderOption = None,
            sender: SenderOption = None, yes: YesOption = False, config: ConfigOption = None,
            operator: OperatorOption = None) -> None:
    """Put held deliveries back in the queue, due now."""
    who = operator_name(operator)
    act_on(config, targets, ("held",), "released",
           lambda store, ids, why: store.release_held(ids, who, why), reason=reason,
           state=state, destination=destination, older_than=older_than, sender=sender,
           yes=yes)


def delete(reason: ReasonOption, targets: TargetsArgument = None, state: StateOption = None,
           destination: DestinationOption = None, older_than: OlderOption = None,
           sender: SenderOption = None, yes: YesOption = False,
           include_uncertain: Annotated[bool, typer.Option(
               "--include-uncertain", help="Delete uncertain deliveries too.")] = False,
           bounce: Annotated[bool, typer.Option(
               "--bounce", help="Send the sender a DSN (committed with the deletion).")] = False,
           config: ConfigOption = None, operator: OperatorOption = None) -> None:
    """Fail deliveries ("deleted by <operator>: <reason>"), sending no DSN unless
    ``--bounce``. Leased ones are never deleted; the records stay until retention."""
    who = operator_name(operator)
    sources = ("queued", "deferred", "held", *(("uncertain",) if include_uncertain else ()))
    reporting_mta = load(config).ehlo_name

    def dsn(message: DeletedMessage) -> NewMessage | None:
        return _deletion_dsn(message, reporting_mta, f"deleted by {who}: {reason}")

    def act(store: Store, ids: list[int], why: str) -> Awaitable[set[int]]:
        if bounce:
            return store.delete_with_bounce(ids, who, why,
                                            include_uncertain=include_uncertain,
                                            head_bytes=DSN_HEADERS_MAX_BYTES, bounce=dsn)
        return store.delete(ids, who, why, include_uncertain=include_uncertain)

    act_on(config, targets, sources, "deleted", act, reason=reason, state=state,
           destination=destination, older_than=older_than, sender=sender, yes=yes,
           hint=" (uncertain ones with --include-uncertain; leased ones never)")


def _deletion_dsn(message: DeletedMessage, reporting_mta: str,
                  evidence: str) -> NewMessage | None:
    """The DSN for an operator's deletion (status 5.0.0, our own words as the diagnostic);
    None for the null sender, a suppressed DSN, or input a DSN cannot carry."""
    if not message.mail_from:
        return None
    end = message.head.find(b"\r\n\r\n")
    headers = (message.head[:end + 2] if end >= 0
               else message.head[:message.head.rfind(b"\r\n") + 2])
    now = datetime.now(UTC)
    try:
        body = build_dsn(
            reporting_mta=reporting_mta, original_sender=message.mail_from,
            original_headers=headers, arrival_date=message.received_at,
            queue_id=queue_id(message.id), now=now,
            failures=[FailedRecipient(recipient=r, status="5.0.0", action="failed",
                                      remote_mta=None, diagnostic=f"X-mta-fleet; {evidence}",
                                      last_attempt=now) for r in message.recipients])
    except ValueError:
        return None
    if body is None:
        return None
    return NewMessage(id=new_message_id(), mail_from="", recipients=[message.mail_from],
                      trace_headers=b"", body=body, client_address="127.0.0.1",
                      helo_name=reporting_mta, auth_user=None, message_id_header=None)
