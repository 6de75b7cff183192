"""A small stand-in for llm-d's latency predictor: one aiohttp server answering both the
prediction API (``POST /predict/bulk/strict``) and the training API
(``POST /add_training_data_bulk``), on 127.0.0.1.

Its model is linear: TTFT = base + per_waiting x waiting + per_token x input tokens
(+ per_running x running); TPOT = a constant. It records every bulk request and every
training entry it receives, and can be told to fail (500) or to stall.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class PredictorServer:
    ttft_base_ms: float = 20.0
    ttft_per_waiting_ms: float = 100.0
    ttft_per_token_ms: float = 1.0
    ttft_per_running_ms: float = 0.0
    tpot_ms: float = 15.0
    # Set: /predict answers 500. stall: /predict waits until released.
    fail: bool = False
    stall: asyncio.Event | None = None
    bulk_requests: list[list[dict[str, Any]]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    trained: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ttft(self, features: dict[str, Any]) -> float:
        return (
            self.ttft_base_ms
            + self.ttft_per_waiting_ms * features["num_request_waiting"]
            + self.ttft_per_token_ms * features["input_token_length"]
            + self.ttft_per_running_ms * features["num_request_running"]
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/predict/bulk/strict", self._predict)
        app.router.add_post("/add_training_data_bulk", self._train)
        app.router.add_get("/status", self._status)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.stall is not None:
            self.stall.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response({"is_ready": True, "model_type": "bayesian_ridge"})

    async def _predict(self, request: web.Request) -> web.Response:
        doc = await request.json()
        rows = doc["requests"]
        self.bulk_requests.append(rows)
        if self.stall is not None:
            await self.stall.wait()
        if self.fail:
            return web.json_response({"detail": "model not ready"}, status=500)
        predictions = [
            {
                "ttft_ms": self.ttft(row),
                "tpot_ms": self.tpot_ms,
                "predicted_at": "2026-01-01T00:00:00Z",
                "model_type": "bayesian_ridge",
                "quantile": 0.9,
                "last_model_load": None,
            }
            for row in rows
        ]
        return web.json_response(
            {
                "predictions": predictions,
                "total_requests": len(rows),
                "successful_predictions": len(rows),
                "failed_predictions": 0,
                "processing_time_ms": 0.1,
            }
        )

    async def _train(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.training.extend(doc["entries"])
        self.trained.set()
        return web.json_response({"message": "accepted"}, status=202)
