"""Leader election on a Kubernetes Lease (``coordination.k8s.io/v1``), as client-go does.

Every EPP replica runs an elector on the same Lease. The holder renews it every retry
period; a candidate takes it when it is free (no holder) or when the record it last
saw has not changed for a whole lease duration. Expiry is judged by the candidate's own
clock from when it observed the record, never by the timestamps inside it, so clock skew
between pods does not matter. A leader that cannot renew within the renew deadline steps
down (and keeps trying as a candidate); a leader that stops gracefully releases the Lease
(empty holder) so another replica takes over at once.

Updates carry the ``resourceVersion`` they read: two candidates writing at once cannot
both win, the loser gets 409 Conflict and tries again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.client.exceptions import ApiException

from common.kube import describe, read_json

__all__ = ["LeaderElector", "LeaseTiming", "deployment_name", "lease_name", "new_identity"]

log = logging.getLogger("epp.leader")

_GROUP = "coordination.k8s.io"
_VERSION = "v1"
_PLURAL = "leases"
# A pod of a Deployment is named <deployment>-<replicaset hash>-<pod suffix>.
_POD_NAME = re.compile(r"^(.+)-[a-z0-9]+-[a-z0-9]+$")


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """controller-runtime's defaults: 15 s lease, 10 s renew deadline, 2 s retries."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


def lease_name(namespace: str, name: str) -> str:
    """The Lease llm-d's EPP replicas share: one per pool (or Deployment)."""
    return f"epp-{namespace}-{name}.llm-d.ai"


def deployment_name(pod_name: str) -> str:
    """The Deployment a pod belongs to, from its generated name."""
    match = _POD_NAME.match(pod_name)
    if match is None:
        raise ValueError(f"cannot tell the Deployment from the pod name {pod_name!r}")
    return match.group(1)


def new_identity() -> str:
    """Unique per process, readable per pod: ``<hostname>_<uuid>`` as controller-runtime."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4()}"


def _micro_time(moment: float) -> str:
    stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class _Record:
    holder: str
    lease_seconds: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int

    @classmethod
    def of(cls, lease: dict[str, Any]) -> _Record:
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            lease_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )


class LeaderElector:
    """Campaign for one Lease; ``is_leader`` says whether this replica holds it now."""

    def __init__(
        self,
        api: Any,
        *,
        namespace: str,
        name: str,
        identity: str | None = None,
        timing: LeaseTiming | None = None,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.identity = identity or new_identity()
        self.timing = timing or LeaseTiming()
        self._api = k8s_client.CustomObjectsApi(api)
        self._on_change = on_change
        self._clock = clock
        self.is_leader = False
        self._observed: _Record | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"leader election {self.name}")

    async def stop(self, *, release: bool = True) -> None:
        """Stop campaigning; a leader releases the Lease unless ``release`` is False."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if release and self.is_leader:
            try:
                async with asyncio.timeout(self.timing.retry_period):
                    await self._release()
                log.info("leader election: released lease %s/%s", self.namespace, self.name)
            except Exception as exc:
                log.warning("leader election: releasing the lease failed: %s", describe(exc))
        self._set_leader(False)

    # -- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        log.info(
            "leader election: campaigning for lease %s/%s as %s",
            self.namespace,
            self.name,
            self.identity,
        )
        while True:
            ok = await self._attempt()
            now = self._clock()
            if ok:
                self._last_renew = now
                if not self.is_leader:
                    log.info("leader election: this replica is now the leader")
                self._set_leader(True)
            elif self.is_leader and now - self._last_renew > self.timing.renew_deadline:
                log.warning(
                    "leader election: could not renew the lease within %.1fs; stepping down",
                    self.timing.renew_deadline,
                )
                self._set_leader(False)
            await asyncio.sleep(self.timing.retry_period)

    async def _attempt(self) -> bool:
        try:
            async with asyncio.timeout(self.timing.retry_period):
                return await self._try_acquire_or_renew()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("leader election: %s", describe(exc))
            return False

    def _set_leader(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            if self._on_change is not None:
                self._on_change(leader)

    # -- one round ----------------------------------------------------------------------

    def _spec(self, old: _Record | None, now_wall: float) -> dict[str, Any]:
        stamp = _micro_time(now_wall)
        ours = old is not None and old.holder == self.identity
        transitions = 0 if old is None else old.transitions + (0 if ours else 1)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.timing.lease_duration)),
            "acquireTime": old.acquire_time if ours and old is not None else stamp,
            "renewTime": stamp,
            "leaseTransitions": transitions,
        }

    async def _try_acquire_or_renew(self) -> bool:
        now = self._clock()
        wall = time.time()
        try:
            lease = await self._get()
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = self._lease_body(self._spec(None, wall), None)
            await self._create(body)
            self._observe(_Record.of(body), now)
            return True
        record = _Record.of(lease)
        if record != self._observed:
            self._observe(record, now)
        held_by_other = record.holder and record.holder != self.identity
        if held_by_other and self._observed_at + self.timing.lease_duration > now:
            return False  # someone else holds it and has renewed within the lease duration
        rv = (lease.get("metadata") or {}).get("resourceVersion")
        body = self._lease_body(self._spec(record, wall), rv)
        try:
            await self._replace(body)
        except ApiException as exc:
            if exc.status == 409:
                return False  # another replica wrote first
            raise
        self._observe(_Record.of(body), now)
        return True

    def _observe(self, record: _Record, now: float) -> None:
        changed_hands = self._observed is None or record.holder != self._observed.holder
        if changed_hands and record.holder and record.holder != self.identity:
            log.info("leader election: lease held by %s", record.holder)
        self._observed = record
        self._observed_at = now

    def _lease_body(self, spec: dict[str, Any], rv: str | None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if rv:
            metadata["resourceVersion"] = rv
        return {
            "apiVersion": f"{_GROUP}/{_VERSION}",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    async def _release(self) -> None:
        lease = await self._get()
        record = _Record.of(lease)
        if record.holder != self.identity:
            return
        stamp = _micro_time(time.time())
        spec = {
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "acquireTime": stamp,
            "renewTime": stamp,
            "leaseTransitions": record.transitions,
        }
        rv = (lease.get("metadata") or {}).get("resourceVersion")
        await self._replace(self._lease_body(spec, rv))

    # -- API calls ----------------------------------------------------------------------

    async def _get(self) -> dict[str, Any]:
        resp = await self._api.get_namespaced_custom_object(
            _GROUP, _VERSION, self.namespace, _PLURAL, self.name, _preload_content=False
        )
        lease: dict[str, Any] = await read_json(resp)
        return lease

    async def _create(self, body: dict[str, Any]) -> None:
        resp = await self._api.create_namespaced_custom_object(
            _GROUP, _VERSION, self.namespace, _PLURAL, body, _preload_content=False
        )
        await read_json(resp)

    async def _replace(self, body: dict[str, Any]) -> None:
        resp = await self._api.replace_namespaced_custom_object(
            _GROUP, _VERSION, self.namespace, _PLURAL, self.name, body, _preload_content=False
        )
        await read_json(resp)
