"""Translation (Chinese→English by default): seq2seq Transformer, label-smoothed teacher forcing,
in-loop beam search scored by SacreBLEU and chrF, `--mode predict` with n-best lists.

Initialisation precedence: resume from the workdir (its model.json) > the encoder from
`config.init_from` (another run, e.g. MLM on Chinese text) or `config.init_from_hf` (a
Hugging Face BERT), through `encoder_jax.pretrained`; its tokenizer becomes the source
tokenizer, a target tokenizer is trained here > fresh, with one joint sentencepiece model
for both sides (`tokenizer.joint`) or one per side.

Token layout: source `ids [SEP]`; target in `[CLS] ids`, target out `ids [SEP]`
([CLS] is BOS, [SEP] is EOS, [PAD] = 0).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from encoder_jax import errors
from encoder_jax import configs, decode, losses, metrics, pretrained as pretrained_lib, reporting
from encoder_jax import workdir as workdir_lib
from encoder_jax.artifact import detokenize
from encoder_jax.data import batching, sources, tokenizer as tokenizer_lib
from encoder_jax.data import translation as data_lib
from encoder_jax.seq2seq import (EncoderDecoder, Seq2SeqConfig, block_ends, decode_kernels,
                                 reorder_beam_cache)
from encoder_jax.tasks.base import Task, stateless

log = logging.getLogger("encoder_jax")

TARGET_TOKENIZER_DIR = "target_tokenizer"  # <workdir>/target_tokenizer/: a separate target model
TRANSLATIONS_DIR = "translations"  # <workdir>/translations/step_N.txt: samples and all hypotheses
# Logits per chunk of the fused output layer + loss (64 MiB float32): 512 rows at V = 32k,
# one chunk for a small vocabulary. 512 rows, not 256: the Transformer-base output layer's
# gradient 0.997 -> 0.912 s on 2 CPU cores for ~125 MiB more temporaries.
OUTPUT_CHUNK_FLOATS = 2 ** 24


# ----------------------------------------------------------------------------- tokenizers and model


def train_tokenizers(config, workdir: str | None, train_source, cache_dir: str):
    """(source, target) tokenizers trained here: one joint model, or one per side."""
    tok_cfg = configs.section(configs.TranslationTokenizerConfig, config.tokenizer, "tokenizer")

    texts = lambda *fields: side_texts(train_source, *fields)
    base = side_config(tok_cfg)
    if tok_cfg.joint:
        joint = tokenizer_lib.get_tokenizer(base, workdir=workdir, cache_dir=cache_dir,
                                            corpus_id=f"{train_source!r}:joint",
                                            texts=texts("source", "target"))
        return joint, joint
    source = tokenizer_lib.get_tokenizer(base, workdir=workdir, cache_dir=cache_dir,
                                         corpus_id=f"{train_source!r}:source", texts=texts("source"))
    return source, target_tokenizer(tok_cfg, base, workdir, train_source, cache_dir, texts("target"))


def side_texts(train_source, *fields: str):
    """() -> the texts of `fields` ("source", "target") of every training pair."""
    def texts():
        for i in range(len(train_source)):
            record = train_source[i]
            yield from (record[f] for f in fields)
    return texts


def side_config(tok_cfg: configs.TranslationTokenizerConfig) -> configs.TokenizerConfig:
    """The plain tokenizer section of one side (what `get_tokenizer` reads)."""
    return configs.TokenizerConfig(**{k: getattr(tok_cfg, k)
                                      for k in configs.field_types(configs.TokenizerConfig)})


def target_tokenizer(tok_cfg, base, workdir, train_source, cache_dir, texts):
    """The separate target-side sentencepiece model, kept in <workdir>/target_tokenizer/."""
    import dataclasses

    target_dir = workdir_lib.path(workdir, TARGET_TOKENIZER_DIR) if workdir else None
    if target_dir:
        os.makedirs(target_dir, exist_ok=True)
    target_cfg = dataclasses.replace(base, vocab_size=tok_cfg.target_vocab_size or base.vocab_size,
                                     model_file=tok_cfg.target_model_file, vocab_file=None,
                                     character_coverage=1.0)
    return tokenizer_lib.get_tokenizer(target_cfg, workdir=target_dir, cache_dir=cache_dir,
                                       corpus_id=f"{train_source!r}:target", texts=texts)


def load_target_tokenizer(workdir: str, source_tokenizer, record: workdir_lib.ModelRecord):
    """A run's target tokenizer: the source one (joint) or <workdir>/target_tokenizer/."""
    if record.fields.get("joint_tokenizer", True):
        return source_tokenizer
    return workdir_lib.load_tokenizer(workdir_lib.path(workdir, TARGET_TOKENIZER_DIR))


def model_config(config, source_vocab: int, target_vocab: int, shape: dict[str, Any] | None,
                 ) -> Seq2SeqConfig:
    """Seq2SeqConfig from `config.model`; `shape` (a pretrained or recorded encoder's) wins."""
    return Seq2SeqConfig.from_config(config.model, source_vocab, target_vocab, **(shape or {}))


def model_record(cfg: Seq2SeqConfig, joint: bool) -> workdir_lib.ModelRecord:
    fields = {k: v for k, v in cfg.to_json().items() if k != "encoder"}
    return workdir_lib.ModelRecord("translate", cfg.encoder, {**fields, "joint_tokenizer": joint})


def build_model(record: workdir_lib.ModelRecord) -> EncoderDecoder:
    fields = {k: v for k, v in record.fields.items() if k != "joint_tokenizer"}
    return EncoderDecoder(Seq2SeqConfig(encoder=record.encoder, **fields))


def resolve_model(config, workdir, train_source, cache_dir):
    """(source tokenizer, target tokenizer, Seq2SeqConfig, pretrained or None, joint)."""
    record = workdir_lib.read_model_record(workdir) if workdir else None
    if record is not None:  # resume: the recorded shape and the workdir's tokenizers
        source_tok = workdir_lib.load_tokenizer(workdir)
        target_tok = load_target_tokenizer(workdir, source_tok, record)
        return (source_tok, target_tok, build_model(record).config, None,
                record.fields.get("joint_tokenizer", True))
    pretrained = pretrained_lib.resolve(config)
    if pretrained is None:
        source_tok, target_tok = train_tokenizers(config, workdir, train_source, cache_dir)
        joint = source_tok is target_tok
        return source_tok, target_tok, model_config(config, source_tok.vocab_size,
                                                    target_tok.vocab_size, None), None, joint
    if pretrained.config.vocab_size != pretrained.tokenizer.vocab_size:
        raise errors.ConfigError(f"{pretrained.source}: encoder vocab {pretrained.config.vocab_size} != "
                                 f"tokenizer vocab {pretrained.tokenizer.vocab_size}")
    if configs.to_dict(config.model).get("share_embeddings"):
        raise errors.ConfigError(f"model.share_embeddings=True with {pretrained.source}: the pretrained "
                                 f"encoder's vocabulary is the source side only; set it False")
    tok_cfg = configs.section(configs.TranslationTokenizerConfig, config.tokenizer, "tokenizer")
    target_tok = target_tokenizer(tok_cfg, side_config(tok_cfg), workdir, train_source, cache_dir,
                                  side_texts(train_source, "target"))
    shape = {f: getattr(pretrained.config, f) for f in pretrained_lib.SHAPE_FIELDS}
    cfg = model_config(config, pretrained.tokenizer.vocab_size, target_tok.vocab_size, shape)
    return pretrained.tokenizer, target_tok, cfg, pretrained, False


# ----------------------------------------------------------------------------- loss


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Per-token means; perplexity from the unsmoothed nll."""
    return metrics.means(sums, perplexity_of="nll")


def target_weights(batch: dict[str, jax.Array]) -> jax.Array:
    return (batch["target_segment_ids"] > 0) * batch["weight"][:, None]


# ----------------------------------------------------------------------------- decoding


def translate_batch(model: EncoderDecoder, params, batch: dict[str, jax.Array], *, beam_size: int,
                    alpha: float, max_len: int, max_len_a: int, max_len_b: float,
                    bos_id: int, eos_id: int, cache_blocks: int = 1,
                    kernels: dict[str, Any] | None = None) -> decode.DecodeOutput:
    """Beam search (greedy for beam 1) over a batch of sources; pure, jittable. The
    self-attention cache is cut into `cache_blocks` blocks of positions, one search loop
    each, so a step reads only the blocks filled so far (`decode`'s `stage_ends`).
    `kernels`: `seq2seq.decode_kernels(params)`, laid out once for many calls (else here)."""
    variables = {"params": params}
    source_seg_BxS = batch["source_segment_ids"]
    encoded_BxSxD = model.apply(variables, batch["source_ids"], source_seg_BxS,
                                method=EncoderDecoder.encode)
    source_cache = model.apply(variables, encoded_BxSxD, kernels,
                               method=EncoderDecoder.source_cache)
    rows = batch["source_ids"].shape[0]
    stage_ends = block_ends(max_len, cache_blocks)
    cache = model.apply(variables, rows, max_len, beam_size, len(stage_ends),
                        method=EncoderDecoder.init_cache)
    limits_B = decode.max_lengths((source_seg_BxS > 0).sum(-1), max_len_a, max_len_b, max_len)
    vocab_major = model.config.tie_output  # (V, N) logits: faster tied, slower untied on CPU

    def tokens_to_logits(ids_N, cache, index, stage):  # the source's keys/values stay out of the loop
        return model.apply(variables, ids_N, cache, index, source_cache, source_seg_BxS,
                           vocab_major, stage, method=EncoderDecoder.decode_step)

    search = dict(batch_size=rows, bos_id=bos_id, eos_id=eos_id, max_len=max_len,
                  max_len_per_row=limits_B, vocab_major=vocab_major, stage_ends=stage_ends)
    if beam_size == 1:
        return decode.greedy_search(tokens_to_logits, cache, **search)
    return decode.beam_search(tokens_to_logits, cache, beam_size=beam_size, alpha=alpha,
                              reorder_cache=reorder_beam_cache, **search)


# ----------------------------------------------------------------------------- evaluation


def evaluation_hooks(workdir, eval_examples, eval_source, target_tok, rows: int,
                     pad_lengths, samples: int, shard_index: int, shard_count: int):
    """eval_batches, summarize_eval (BLEU, chrF, teacher-forced loss) and on_eval (translations file)."""
    references = [eval_source[i]["target"] for i in range(len(eval_source))]
    sources_text = [eval_source[i]["source"] for i in range(len(eval_source))]
    cache: dict[str, Any] = {}

    def eval_batches():
        return data_lib.eval_batches(eval_examples, global_batch_rows=rows, pad_lengths=pad_lengths,
                                     shard_index=shard_index, shard_count=shard_count)

    def summarize_eval(outputs):
        out = metrics.collect_outputs(outputs)
        hypotheses = [""] * len(references)
        for index, tokens_T in zip(out["index"], out["tokens"]):
            hypotheses[int(index)] = detokenize(target_tok, tokens_T)
        scores = metrics.bleu_chrf(hypotheses, references)
        cache["last"] = (hypotheses, scores)
        sums = {k: float(out[k].sum()) for k in ("loss", "nll", "accuracy", "denominator")}
        return {**summarize(sums), "bleu": scores["bleu"], "chrf": scores["chrf"]}

    def on_eval(step, summary, state=None):
        if not workdir or "last" not in cache:
            return
        hypotheses, scores = cache["last"]
        path = write_translations(workdir_lib.path(workdir, TRANSLATIONS_DIR), step, sources_text,
                                  references, hypotheses, scores, samples)
        with open(path, encoding="utf-8") as f:  # markdown: two spaces end a line
            reporting.write_text_summary(workdir, "eval/translations",
                                         f.read().replace("\n", "  \n"), step)

    return dict(eval_batches=eval_batches, summarize_eval=summarize_eval, on_eval=on_eval)


def write_translations(directory: str, step: int, sources_text, references, hypotheses, scores,
                       samples: int) -> str:
    """step_N.txt: the metric signatures, `samples` source/reference/hypothesis triples; step_N.hyp."""
    os.makedirs(directory, exist_ok=True)
    lines = [f"step {step}: BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f}",
             f"BLEU signature: {scores['bleu_signature']}", f"chrF signature: {scores['chrf_signature']}",
             ""]
    for i in range(min(samples, len(references))):
        lines += [f"SRC {sources_text[i]}", f"REF {references[i]}", f"HYP {hypotheses[i]}", ""]
    workdir_lib.write_text(os.path.join(directory, f"step_{step}.hyp"), "\n".join(hypotheses) + "\n")
    return workdir_lib.write_text(os.path.join(directory, f"step_{step}.txt"), "\n".join(lines))


# ----------------------------------------------------------------------------- task


def model_functions(model: EncoderDecoder, tr: configs.TranslateConfig, max_len: int,
                    bos_id: int, eos_id: int):
    """(init_params, loss(params, batch, rng, train), eval_fn) of the seq2seq model."""

    def init_params(rng):
        return model.init(rng, jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))["params"]

    def fused_sums(params, batch, rng, train):
        """(mean loss to differentiate, per-row sums): the output layer and the loss fused."""
        y_BxTxD, table_VxD, bias_V = model.apply(
            {"params": params}, batch["source_ids"], batch["target_in"],
            batch["source_segment_ids"], batch["target_segment_ids"], deterministic=not train,
            rngs={"dropout": rng}, method=EncoderDecoder.features)
        weights_BxT = target_weights(batch)
        loss_mean, rows = losses.output_cross_entropy(
            y_BxTxD, table_VxD, bias_V, batch["target_out"], weights_BxT,
            tr.label_smoothing if train else 0.0,
            chunk_rows=max(1, OUTPUT_CHUNK_FLOATS // table_VxD.shape[0]), mean=True)
        return loss_mean, {**rows, "denominator": weights_BxT.sum(-1)}

    def row_sums(params, batch, rng, train):
        return fused_sums(params, batch, rng, train)[1]

    def loss(params, batch, rng, train):
        loss_mean, rows = fused_sums(params, batch, rng, train)  # the mean: see output_cross_entropy
        return loss_mean, {k: v.sum() for k, v in rows.items()}

    def eval_fn(params, model_state, batch, rng):
        del model_state
        out = translate_batch(model, params, batch, beam_size=tr.eval_beam_size,
                              alpha=tr.length_penalty, max_len=max_len, max_len_a=tr.max_len_a,
                              max_len_b=tr.max_len_b, bos_id=bos_id, eos_id=eos_id,
                              cache_blocks=tr.cache_blocks)
        return {**row_sums(params, batch, rng, False), "tokens": out.tokens[:, 0],
                "index": batch["index"], "weight": batch["weight"]}

    return init_params, loss, eval_fn


def build(config, workdir: str | None, shard_index: int = 0, shard_count: int = 1) -> Task:
    """The translation task: sentence pairs, tokenizers, seq2seq model, loss, BLEU evaluation."""
    data_cfg = configs.section(configs.TranslationDataConfig, config.data, "data")
    tr = configs.section(configs.TranslateConfig, config.translate, "translate")
    wants_pretrained = pretrained_lib.wants_pretrained(config)  # both init fields set: fails here
    cache_dir = data_cfg.data_dir or sources.default_data_dir()
    splits = data_lib.open_pair_splits(data_cfg, cache_dir)
    source_tok, target_tok, cfg, pretrained, joint = resolve_model(config, workdir, splits["train"],
                                                                   cache_dir)
    if data_cfg.max_len > min(cfg.encoder.max_len, cfg.max_target_len):
        raise errors.ConfigError(f"data.max_len={data_cfg.max_len} exceeds model.max_len="
                                 f"{cfg.encoder.max_len} or model.max_target_len={cfg.max_target_len}")
    if workdir and shard_index == 0:
        if pretrained is not None:
            source_tok.save(workdir)
        workdir_lib.write_model_record(workdir, model_record(cfg, joint))
    tokenizers = (source_tok, target_tok)
    train_size = len(splits["train"])
    used = _Head(splits["train"], min(data_cfg.max_train_examples or train_size, train_size))
    dropped, checked = data_lib.count_too_long(used, tokenizers, data_cfg.max_len)
    if dropped == checked:
        raise errors.ConfigError(f"every training pair checked ({checked}) is empty or longer than "
                                 f"data.max_len={data_cfg.max_len} tokens; raise data.max_len")
    log.info("training pairs: dropped %d of %d checked (longer than data.max_len=%d tokens or "
             "empty)", dropped, checked, data_cfg.max_len)
    model = EncoderDecoder(cfg)
    init_params, loss, eval_fn = model_functions(model, tr, data_cfg.max_len, target_tok.cls_id,
                                                 target_tok.sep_id)
    eval_examples = data_lib.eval_examples(splits["validation"], tokenizers, data_cfg.max_len,
                                           limit=data_cfg.max_eval_examples)
    pad_lengths = batching.make_pad_lengths(data_cfg.pad_lengths, data_cfg.max_len)
    eval_source = _Head(splits["validation"], len(eval_examples))

    def init_from(params):
        return pretrained_lib.graft_encoder(params, pretrained or pretrained_lib.resolve(config))

    return Task(
        name="translate", init_params=init_params, loss_fn=stateless(loss),
        train_data=data_lib.train_dataset(splits["train"], source_tok, target_tok, data_cfg,
                                          seed=config.seed, shard_index=shard_index,
                                          shard_count=shard_count),
        example_batch=data_lib.example_batch(
            batching.budget_rows(pad_lengths[-1], data_cfg.max_tokens, data_cfg.batch_multiple)
            // shard_count, pad_lengths[-1]),
        summarize=summarize, tokens_in_batch=lambda b: int((b["target_segment_ids"] > 0).sum()
                                                          + (b["source_segment_ids"] > 0).sum()),
        init_from=init_from if wants_pretrained else None, eval_fn=eval_fn,
        batch_rows={"data.batch_multiple": data_cfg.batch_multiple // shard_count,
                    "translate.eval_batch_size": tr.eval_batch_size // shard_count},
        **evaluation_hooks(workdir, eval_examples, eval_source, target_tok,
                           tr.eval_batch_size, pad_lengths, tr.samples, shard_index,
                           shard_count))


class _Head:
    """The first `count` records of a source (data.max_train_examples, max_eval_examples)."""

    def __init__(self, source, count: int):
        self._source, self._count = source, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int):
        return self._source[index]


# ----------------------------------------------------------------------------- predict


def predict(config, run: workdir_lib.TrainedRun) -> str:
    """Translates `predict.input` (one sentence per line): text out, plus jsonl with scores / n-best."""
    import json

    from tqdm import tqdm

    if run.record.task != "translate":
        raise errors.MissingFileError(f"{run.workdir!r} holds no translation run ({workdir_lib.MODEL_FILE} "
                                      f"task={run.record.task!r}): train a translation run there first")
    pred_cfg = configs.section(configs.PredictConfig, config.predict, "predict")
    tr = configs.section(configs.TranslateConfig, config.translate, "translate")
    data_cfg = configs.section(configs.TranslationDataConfig, config.data, "data")
    if not pred_cfg.input:
        raise errors.ConfigError("--mode predict needs --config.predict.input=FILE (one sentence per line)")
    lines = data_lib.read_source_lines(pred_cfg.input)
    target_tok = load_target_tokenizer(run.workdir, run.tokenizer, run.record)
    model = build_model(run.record)
    beam = max(tr.beam_size, pred_cfg.nbest)
    examples = data_lib.eval_examples([{"source": line, "target": ""} for line in lines],
                                      (run.tokenizer, target_tok), data_cfg.max_len)
    translate = jax.jit(lambda params, kernels, batch: translate_batch(
        model, params, batch, beam_size=beam, alpha=tr.length_penalty, max_len=data_cfg.max_len,
        max_len_a=tr.max_len_a, max_len_b=tr.max_len_b, bos_id=target_tok.cls_id,
        eos_id=target_tok.sep_id, cache_blocks=tr.cache_blocks, kernels=kernels))
    kernels = jax.jit(decode_kernels)(run.params)  # once, not per batch
    results: dict[int, list[tuple[str, float]]] = {}
    batches = data_lib.eval_batches(examples, global_batch_rows=pred_cfg.batch_size,
                                    pad_lengths=batching.make_pad_lengths(data_cfg.pad_lengths,
                                                                          data_cfg.max_len))
    total = -(-len(examples) // pred_cfg.batch_size)
    for batch in tqdm(batches, total=total, desc="translate", unit="batch"):
        out = jax.device_get(translate(run.params, kernels, batch))
        for row, index in enumerate(batch["index"]):
            if batch["weight"][row] > 0:
                results[int(index)] = [
                    (detokenize(target_tok, out.tokens[row, k]),
                     float(out.scores[row, k])) for k in range(min(pred_cfg.nbest, beam))]
    output = pred_cfg.output or workdir_lib.path(run.workdir, "predictions.txt")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    workdir_lib.write_text(output, "".join(
        ("" if not lines[i].strip() else results[i][0][0]) + "\n" for i in range(len(lines))))
    records = [json.dumps({"index": i, "source": lines[i],
                           "translation": "" if not lines[i].strip() else results[i][0][0],
                           "score": results[i][0][1],
                           "nbest": [{"translation": t, "score": s} for t, s in results[i]]},
                          ensure_ascii=False) + "\n" for i in range(len(lines))]
    workdir_lib.write_text(os.path.splitext(output)[0] + ".jsonl", "".join(records))
    log.info("wrote %d translations to %s", len(lines), output)
    return output
