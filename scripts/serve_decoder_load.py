"""Concurrent /v1/generate requests against a running `kron-adapters serve` (a decoder): N
requests of T new tokens from C clients, each waiting for its answer; prints the generated
tokens a second over the whole run. Standard library only.

    kron-adapters serve --model SmolLM2-135M-Instruct.Q4_1.gguf --addr 127.0.0.1:8765 \
        --adapter lora=tests/fixtures/smollm2/peft_lora [--base-weights int8] &
    python3 scripts/serve_decoder_load.py 127.0.0.1:8765 64 16 32 lora   # ADDR N C T [ADAPTER]
"""

import json
import sys
import threading
import time
import urllib.request

PROMPTS = [
    "The capital of France is",
    "Write a poem about the sea.",
    "Once upon a time",
    "The best way to learn is",
]


def main():
    addr, n, clients, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    adapter = sys.argv[5] if len(sys.argv) > 5 else None
    done, lock = [], threading.Lock()

    def client(first):
        for j in range(first, n, clients):
            body = {"prompt": PROMPTS[j % len(PROMPTS)], "max_new_tokens": tokens}
            if adapter:
                body["adapter"] = adapter
            req = urllib.request.Request(
                f"http://{addr}/v1/generate",
                data=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
            answer = json.load(urllib.request.urlopen(req))
            with lock:
                done.append(answer["tokens"])

    start = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.time() - start
    print(f"{len(done)} requests, {sum(done)} tokens in {took:.1f} s: "
          f"{sum(done) / took:.1f} tokens/s")


if __name__ == "__main__":
    main()
