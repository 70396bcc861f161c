"""The engine core in its own process: same tokens as in-process, stats across the pipe, a disconnect frees
KV blocks in the core, a killed core fails every stream with EngineDeadError, and a core never outlives
its parent (SIGKILL of the front-end process)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from _support.polling import wait_for

from llmray.engine.errors import EngineDeadError, RequestError
from llmray.engine.llm import LLM, AsyncLLM
from llmray.engine.sampling_params import SamplingParams

KW = {"kernels": "torch", "max_model_len": 256, "num_kv_blocks": 64, "block_size": 4}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    engine = AsyncLLM(tiny_model_dir, **KW)
    yield engine
    engine.shutdown()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_process_core_matches_offline_and_sends_stats(llm, tiny_model_dir):
    assert llm.core_pid not in (None, os.getpid()) and llm.engine is None  # the model lives elsewhere
    prompts = ["the quick brown fox", "hello there, general"]
    offline = LLM(tiny_model_dir, **KW).generate(prompts, GREEDY)

    async def main():
        async def one(p):
            return [o async for o in llm.generate_stream(p, GREEDY)]

        return await asyncio.gather(*(one(p) for p in prompts))

    before = llm.stats()["generation_tokens_total"]
    for outs, ref in zip(asyncio.run(main()), offline, strict=True):
        assert sum((o.new_token_ids for o in outs), []) == outs[-1].token_ids == ref.token_ids
        assert "".join(o.new_text for o in outs) == outs[-1].text == ref.text
        assert outs[-1].finish_reason == "length"
    s = llm.stats()  # the counters come from the core process with its step messages
    assert s["generation_tokens_total"] - before == 24 and s["num_running"] == 0
    assert s["core_pid"] == llm.core_pid and s["num_free_blocks"] == s["num_total_blocks"]


def test_stop_string_is_applied_in_the_front_end(llm):
    async def run(params):
        return [o async for o in llm.generate_stream("the quick brown fox", params)][-1]

    full = asyncio.run(run(GREEDY))
    assert full.text
    k = max(i for i in range(len(full.text)) if full.text.find(full.text[i]) == i)  # last new character
    stop = full.text[k]
    cut = asyncio.run(run(SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])))
    assert cut.text == full.text[:k] and cut.finish_reason == "stop" and cut.stop_reason == stop
    assert len(cut.token_ids) <= len(full.token_ids)


def test_refused_request_names_the_field(llm):
    async def main():
        async for _ in llm.generate_stream(list(range(250)), SamplingParams(max_tokens=50)):
            pass

    with pytest.raises(RequestError, match="max_tokens=50") as info:
        asyncio.run(main())
    assert info.value.param == "max_tokens" and llm.is_alive()


def test_disconnect_frees_kv_blocks_in_the_core(llm):
    async def main():
        n = 0
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        async for _ in llm.generate_stream(list(range(30)), params):
            n += 1
            if n == 2:
                running = llm.stats()
                break  # the client went away
        return running

    running = asyncio.run(main())
    assert running["num_free_blocks"] < running["num_total_blocks"]  # it held blocks in the core
    assert wait_for(lambda: llm.stats()["num_running"] == 0, 30)
    s = llm.stats()
    assert s["num_free_blocks"] == s["num_total_blocks"] and s["generation_tokens_total"] > 0


def test_killed_core_fails_every_stream(tiny_model_dir):
    llm = AsyncLLM(tiny_model_dir, **KW)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def one(i: int):
        got = 0
        try:
            async for _ in llm.generate_stream(f"stream {i}", params):
                got += 1
                if i == 0 and got == 2:
                    os.kill(llm.core_pid, signal.SIGKILL)
        except EngineDeadError as e:
            return got, str(e)
        return got, None

    async def main():
        return await asyncio.gather(*(one(i) for i in range(4)))

    results = asyncio.run(main())
    assert all(err is not None and "exit code -9" in err for _, err in results), results
    assert not llm.is_alive()
    assert asyncio.run(one(5)) == (0, results[0][1])  # a new request is refused at once
    llm.shutdown()


def test_core_dies_with_its_parent(tiny_model_dir, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from llmray.engine.llm import AsyncLLM
        llm = AsyncLLM({str(tiny_model_dir)!r}, kernels="torch", max_model_len=64, num_kv_blocks=16)
        print(llm.core_pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        core_pid = int(proc.stdout.readline())
        assert _pid_alive(core_pid)
        proc.kill()  # SIGKILL: no cleanup runs in the front-end
        proc.wait()
        assert wait_for(lambda: not _pid_alive(core_pid), 15), "the engine core outlived its parent"
    finally:
        proc.kill()


def test_adapter_load_does_not_stall_the_steps(tiny_model_dir, tmp_path):
    """An adapter's files are read on the loader thread: the running request keeps stepping meanwhile, and
    the command is answered (in order) once the adapter is registered."""
    import threading

    from _support.lora import ATTN, make_peft_adapter

    from llmray.engine.core import EngineCore
    from llmray.engine.llm import build_engine
    from llmray.model.checkpoint import load_model

    make_peft_adapter(load_model(tiny_model_dir, kernels="torch").eval(), tmp_path / "a", ATTN, 4, 8, seed=1)
    engine = build_engine(tiny_model_dir, enable_lora=True, max_loras=2, max_lora_rank=8, **KW)
    read, release = engine.lora.load, threading.Event()

    def slow_read(name, path):  # a slow disk: the read waits until the test has seen steps go on
        release.wait(30)
        return read(name, path)

    engine.lora.load = slow_read
    sent: list[tuple] = []
    core = EngineCore(engine, sent.append)
    core.handle(("add", 1, [5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), None))
    core.handle(("call", 7, "add_lora", ("a", str(tmp_path / "a"))))
    core.handle(("call", 8, "list_loras", ()))  # answered after the load, not before
    for _ in range(5):
        core.step()
        core.advance_calls()
    assert sum(m[0] == "step" and 1 in m[1] for m in sent) == 5 and not [m for m in sent if m[0] == "reply"]
    release.set()
    assert wait_for(lambda: (core.advance_calls(), len([m for m in sent if m[0] == "reply"]) == 2)[1], 30)
    replies = [m for m in sent if m[0] == "reply"]
    assert replies == [("reply", 7, True, ["a"]), ("reply", 8, True, ["a"])]
