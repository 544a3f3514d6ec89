"""A local online endpoint: `python -m shared.backends.local.serve ENDPOINT_DIR`.

Serves one registered model version on 127.0.0.1, behind keys like an Azure ML managed endpoint:
`POST /score` (Azure ML's chat schema), `POST /v1/chat/completions` (OpenAI's), `GET /health`.
Keys are compared in constant time and never logged; every failure is JSON, never a traceback."""

from __future__ import annotations

import hmac
import json
import logging
import signal
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from shared.backends.local.httpserver import ReplyingHandler
from shared.backends.local.scoring import BadRequest, ChatRequest, parse_openai, parse_score
from shared.backends.local.tiny_model import END_OF_TURN

log = logging.getLogger("endpoint")
MAX_BODY_BYTES = 1024 * 1024


class ChatModel:
    """The model behind the endpoint; one generation at a time (CPU or one GPU)."""

    def __init__(self, model_folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_folder / "components" / "tokenizer")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_folder / "model", dtype=dtype)
        if (model_folder / "peft").exists():  # adapter-only (merge_lora_weights=false): base + LoRA
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_folder / "peft")  # type: ignore[assignment]
        self.model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types `to` oddly
        self.device = device
        end = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.stop_ids = [i for i in (end, self.tokenizer.eos_token_id) if isinstance(i, int) and i >= 0]
        self._lock = threading.Lock()

    def generate(self, request: ChatRequest, timeout_s: float) -> tuple[str, int, int, bool]:
        """(text, prompt tokens, new tokens, finished at a stop token)."""
        import torch

        encoded = self.tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        inputs = {key: value.to(self.device) for key, value in encoded.items()}  # type: ignore[union-attr]
        options: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "do_sample": request.do_sample}
        if request.do_sample:
            options.update(temperature=request.temperature, top_p=request.top_p)
        with self._lock, torch.inference_mode():
            output = self.model.generate(
                **inputs,
                **options,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                max_time=timeout_s,
            )
        prompt_length = inputs["input_ids"].shape[1]
        new = output[0, prompt_length:].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return str(text), prompt_length, len(new), stopped


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path, model: ChatModel, keys: list[str], timeout_s: float, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.directory, self.model, self.keys, self.timeout_s, self.name = directory, model, keys, timeout_s, name

    def record_request(self) -> None:
        (self.directory / "last_request").write_text(datetime.now(UTC).isoformat())


class _Handler(ReplyingHandler):
    server: EndpointServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)  # the request line and status, never headers

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        # Compare against every key, always, so timing says nothing about which one matched.
        matches = [hmac.compare_digest(presented.encode(), key.encode()) for key in self.server.keys]
        return any(matches)

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _HttpError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            if int(length) <= 8 * MAX_BODY_BYTES:  # read it, so the client hears the 413, not a broken pipe
                self.rfile.read(int(length))
            else:
                self.close_connection = True
            raise _HttpError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _HttpError(400, f"malformed JSON: {error}") from None

    def do_GET(self) -> None:
        if self.path == "/health":
            self.send_json(200, {"status": "ready", "endpoint": self.server.name})
        else:
            self.send_json(404, {"error": f"no route GET {self.path}"})

    def do_POST(self) -> None:
        routes = {"/score": parse_score, "/v1/chat/completions": parse_openai}
        parse = routes.get(self.path.split("?", 1)[0])
        try:
            if parse is None:
                raise _HttpError(404, f"no route POST {self.path}")
            if not self._authorized():
                raise _HttpError(401, "missing or invalid key: send 'Authorization: Bearer <key>'")
            body = self._body()
            request = parse(body)
            self.server.record_request()
            started = time.monotonic()
            text, prompt_tokens, new_tokens, stopped = self.server.model.generate(request, self.server.timeout_s)
            if not stopped and time.monotonic() - started >= self.server.timeout_s:
                raise _HttpError(408, f"the request took longer than {self.server.timeout_s:.0f} s")
        except _HttpError as error:
            self.send_json(error.status, {"error": str(error)})
            return
        except BadRequest as error:
            self.send_json(400, {"error": str(error)})
            return
        except Exception:
            log.exception("scoring failed")
            self.send_json(500, {"error": "the model failed to answer; see the endpoint log"})
            return
        if parse is parse_score:
            self.send_json(200, {"output": text})
            return
        self.send_json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.server.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop" if stopped else "length",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": new_tokens,
                    "total_tokens": prompt_tokens + new_tokens,
                },
            },
        )


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    directory = Path(argv[0]).resolve()
    spec = json.loads((directory / "endpoint.json").read_text())
    keys = json.loads((directory / "keys.json").read_text())
    model = ChatModel(Path(spec["model_path"]))
    server = EndpointServer(directory, model, [keys["primary_key"], keys["secondary_key"]],
                            spec["request_timeout_s"], spec["name"])  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    (directory / "ready.json").write_text(json.dumps({"port": server.server_address[1]}))
    log.info("endpoint %s serving %s:%s on port %s", spec["name"], spec["model_name"], spec["model_version"],
             server.server_address[1])  # fmt: skip
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
