"""RedisStageMetrics against a real redis-server: length, lag, pending, oldest pending age, live replicas."""

from __future__ import annotations

import asyncio
import time

from autoscale_support import NEEDS_REDIS

from layerline.autoscale.metrics import AutoscaleMetrics, RedisStageMetrics
from layerline.engines.processes import free_port
from layerline.runtime.redis_resp import RespConnection
from layerline.runtime.redis_server import start_redis_server

pytestmark = NEEDS_REDIS


def test_reads_each_stage_stream(tmp_path):
    server = start_redis_server(free_port(), tmp_path / "redis")

    async def go():
        conn = RespConnection(server.url)
        reader = RedisStageMetrics(server.url, stages=3, prefix="m")
        try:
            # before any worker made the groups: empty, no error
            assert [(s.length, s.lag, s.pending, s.live) for s in await reader.read()] == [(0, 0, 0, 0)] * 3
            for k in range(3):
                await conn.execute("XGROUP", "CREATE", f"m:s{k}", f"stage{k}", "$", "MKSTREAM")
            for i in range(5):
                await conn.execute("XADD", "m:s1", "*", "rid", str(i))
            await conn.execute("XADD", "m:s2", "*", "rid", "9")
            # replica c1 of stage 1 takes two entries; c1 is alive, c2 (stopped) is not
            await conn.execute("XREADGROUP", "GROUP", "stage1", "c1", "COUNT", 2, "STREAMS", "m:s1", ">")
            await conn.execute("SADD", "m:consumers:1", "c1", "c2")
            await conn.execute("SET", "m:alive:1:c1", "1", "PX", 3000)
            await asyncio.sleep(0.25)
            t0 = time.monotonic()
            s0, s1, s2 = await reader.read()
            assert (s0.length, s0.lag, s0.pending, s0.oldest_pending_age_s, s0.live) == (0, 0, 0, 0.0, 0)
            assert (s1.length, s1.lag, s1.pending, s1.live, s1.backlog) == (5, 3, 2, 1, 5)
            assert 0.2 <= s1.oldest_pending_age_s < 0.25 + (time.monotonic() - t0) + 1.0
            assert (s2.length, s2.lag, s2.pending) == (1, 1, 0)
            assert s1.redelivered == 0 and s1.dead_letters == 0
            # c3 takes over one of c1's entries (delivered twice now); one request was dead-lettered
            await conn.execute("XAUTOCLAIM", "m:s1", "stage1", "c3", 0, "0-0", "COUNT", 1)
            await conn.execute("XADD", "m:dead", "*", "rid", "4", "error", "poison")
            s0, s1, s2 = await reader.read()
            assert (s1.pending, s1.redelivered, s1.dead_letters, s2.dead_letters) == (2, 1, 1, 1)
            # exported with the gateway's conventions
            exported = AutoscaleMetrics(3)
            for s in (s0, s1, s2):
                exported.observe(s)
            exported.replicas(1, 1, 2)
            text = exported.render().decode()
            assert 'layerline_autoscale_lag{stage="1"} 3.0' in text
            assert 'layerline_autoscale_pending{stage="1"} 2.0' in text
            assert 'layerline_autoscale_stream_length{stage="2"} 1.0' in text
            assert 'layerline_autoscale_replicas_desired{stage="1"} 2.0' in text
            assert 'layerline_autoscale_decisions_total{direction="up",stage="0"} 0.0' in text
            assert 'layerline_autoscale_redelivered_pending{stage="1"} 1.0' in text
            assert "layerline_dead_letter_entries 1.0" in text
        finally:
            reader.close()
            conn.close()

    try:
        asyncio.run(asyncio.wait_for(go(), 20.0))
    finally:
        server.stop()
