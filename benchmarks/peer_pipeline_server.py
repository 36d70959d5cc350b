"""The peer a user would otherwise write: `transformers` pipeline("text-classification") behind
FastAPI, one request at a time (no batching across requests), on a Hugging Face directory.

    python benchmarks/peer_pipeline_server.py HF_DIR --port 8001 [--max_length 128]

Same request shape as `encoder_jax.serve`'s /v1/classify ({"texts": [...]}); answers
{"results": [{"label", "score", "probabilities"}]}. Needs torch, transformers, fastapi, uvicorn.
"""

import argparse
import threading

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline


class ClassifyRequest(BaseModel):
    texts: list[str]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max_length", type=int, default=128)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    classifier = pipeline("text-classification", model=args.hf_dir, tokenizer=args.hf_dir, device=-1)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/ready")
    def ready():
        return {"ready": True}

    @app.post("/v1/classify")
    def classify(request: ClassifyRequest):
        with lock:  # one request at a time: the pipeline is not batched across requests
            outputs = classifier(request.texts, top_k=None, truncation=True,
                                 max_length=args.max_length)
        results = []
        for scores in outputs:
            best = max(scores, key=lambda s: s["score"])
            results.append({"label": best["label"], "score": best["score"],
                            "probabilities": {s["label"]: s["score"] for s in scores}})
        return {"results": results}

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
