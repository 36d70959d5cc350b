"""Text classification: encoder + pooled head, label smoothing, exact whole-split metrics.

Initialisation precedence (train.run): resume from the workdir > `config.init_from`
(an MLM run's workdir) or `config.init_from_hf` (a Hugging Face BERT directory): its
encoder params, tokenizer and model shape, the head fresh; setting both is an error >
fresh. Pretrained encoders come through `encoder_jax.pretrained`.

Model shape: `model.<arch field>` set explicitly > the pretrained run's (or, on
resume, the workdir's `model.json`) > `model.scratch`. An explicit value that
disagrees with the pretrained or recorded shape is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from encoder_jax import pretrained as pretrained_lib
from encoder_jax.data import classification as data_lib, labels as labels_lib
from encoder_jax.data.sources import DataError
from encoder_jax.layers import EncoderConfig

log = logging.getLogger("encoder_jax")

ARCH_FIELDS = ("hidden_dim", "num_layers", "num_heads", "mlp_dim", "max_len", "type_vocab_size",
               "activation", "layer_norm_eps", "pre_norm", "use_pooler")
MODEL_FILE = "model.json"
REPORT_DIR, BEST_REPORT_DIR = "report", "report_best"


# ----------------------------------------------------------------------------- model shape


def architecture(model_cfg, recorded: dict[str, Any] | None, recorded_from: str) -> dict[str, Any]:
    """Arch fields: explicit > recorded (pretrained / model.json) > model.scratch > defaults."""
    explicit = {f: model_cfg.get(f) for f in ARCH_FIELDS if model_cfg.get(f) is not None}
    if recorded is None:
        defaults = {f.name: f.default for f in dataclasses.fields(EncoderConfig) if f.name in ARCH_FIELDS}
        scratch = model_cfg.get("scratch")
        return {**defaults, **(scratch.to_dict() if scratch else {}), **explicit}
    for field, value in explicit.items():
        if recorded.get(field) != value:
            raise ValueError(f"model.{field}={value!r} but {recorded_from} has {field}="
                             f"{recorded.get(field)!r}: drop the override (the shape comes from there)")
    return {f: recorded[f] for f in ARCH_FIELDS}


def encoder_config_from(model_cfg, arch: dict[str, Any], vocab_size: int) -> EncoderConfig:
    """EncoderConfig from resolved arch fields + the run's dropout/dtype/init settings."""
    from encoder_jax.tasks.mlm import encoder_config

    extra = {k: v for k, v in model_cfg.to_dict().items() if k not in ARCH_FIELDS and k != "scratch"}
    return encoder_config(ml_collections.ConfigDict({**extra, **arch}), vocab_size)


def model_record(cfg: EncoderConfig, num_classes: int, pooling: str) -> dict[str, Any]:
    """What predict needs to rebuild the model: EncoderConfig fields, classes, pooling."""
    encoder = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EncoderConfig)}
    encoder["dtype"], encoder["param_dtype"] = jnp.dtype(cfg.dtype).name, jnp.dtype(cfg.param_dtype).name
    return {"encoder": encoder, "num_classes": num_classes, "pooling": pooling}


def load_model_record(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, MODEL_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_model(record: dict[str, Any]):
    """BertForClassification from a model.json record."""
    from encoder_jax.models import BertForClassification

    enc = dict(record["encoder"])
    enc["dtype"], enc["param_dtype"] = jnp.dtype(enc["dtype"]), jnp.dtype(enc["param_dtype"])
    return BertForClassification(EncoderConfig(**enc), record["num_classes"], record["pooling"])


# ----------------------------------------------------------------------------- loss and augmentation


def classification_loss(logits_BxC: jax.Array, labels_B: jax.Array, weights_B: jax.Array,
                        label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean (label-smoothed) cross-entropy over real rows, and metric sums with their denominator."""
    logits_BxC = logits_BxC.astype(jnp.float32)
    targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BxC.shape[-1]), label_smoothing)
    xent_B = optax.softmax_cross_entropy(logits_BxC, targets_BxC)
    denominator = weights_B.sum()
    loss_sum = (xent_B * weights_B).sum()
    correct = ((logits_BxC.argmax(-1) == labels_B) * weights_B).sum()
    return loss_sum / jnp.maximum(denominator, 1.0), {
        "loss": loss_sum, "accuracy": correct, "denominator": denominator}


def augment_tokens(key: jax.Array, batch: dict[str, jax.Array], *, delete_rate: float,
                   mask_rate: float, mask_id: int, special_ids: tuple[int, ...]) -> dict[str, jax.Array]:
    """Random token deletion (survivors shift left) then [MASK] replacement; specials untouched."""
    delete_key, mask_key = jax.random.split(key)
    ids_BxL, types_BxL, seg_BxL = batch["ids"], batch["type_ids"], batch["segment_ids"]
    regular_BxL = (seg_BxL > 0) & ~jnp.isin(ids_BxL, jnp.asarray(special_ids))
    if delete_rate > 0:
        keep_BxL = ~(regular_BxL & (jax.random.uniform(delete_key, ids_BxL.shape) < delete_rate))
        keep_BxL = keep_BxL & (seg_BxL > 0)
        order_BxL = jnp.argsort(~keep_BxL, axis=1, stable=True)  # kept tokens first, in order
        live_BxL = jnp.arange(ids_BxL.shape[1])[None, :] < keep_BxL.sum(1, keepdims=True)
        take = lambda x: jnp.where(live_BxL, jnp.take_along_axis(x, order_BxL, axis=1), 0)
        ids_BxL, types_BxL, seg_BxL = take(ids_BxL), take(types_BxL), take(seg_BxL)
        regular_BxL = take(regular_BxL).astype(bool)
    if mask_rate > 0:
        masked_BxL = regular_BxL & (jax.random.uniform(mask_key, ids_BxL.shape) < mask_rate)
        ids_BxL = jnp.where(masked_BxL, mask_id, ids_BxL)
    return {**batch, "ids": ids_BxL, "type_ids": types_BxL, "segment_ids": seg_BxL}


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Train-window sums -> means."""
    denominator = max(float(sums["denominator"]), 1.0)
    return {k: float(v) / denominator for k, v in sums.items() if k != "denominator"}


def collect_outputs(outputs) -> dict[str, np.ndarray]:
    """Per-batch eval outputs -> one array per key over the real rows, each example once."""
    parts = list(outputs)
    merged = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    real = merged["weight"] > 0
    merged = {k: v[real] for k, v in merged.items()}
    _, first = np.unique(merged["index"], return_index=True)  # sorted by example index
    return {k: v[first] for k, v in merged.items()}


def softmax(logits_NxC: np.ndarray) -> np.ndarray:
    z_NxC = np.asarray(logits_NxC, np.float64)
    z_NxC = np.exp(z_NxC - z_NxC.max(-1, keepdims=True))
    return z_NxC / z_NxC.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- data selection


def select_examples(config, train_ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Indices of the train split to train on and, for a CV fold, to evaluate on (else None).

    `data.max_train_examples` keeps a fixed random subset (seeded by data.subset_seed);
    `cv.fold` (with `cv.folds`) holds out one stratified fold of what remains.
    """
    indices = np.arange(len(train_ids_N))
    limit = config.data.get("max_train_examples")
    if limit:
        rng = np.random.default_rng(config.data.get("subset_seed", 0))
        indices = np.sort(rng.permutation(indices)[:limit])
    cv = config.get("cv") or {}
    if cv.get("fold") is None:
        return indices, None
    from sklearn.model_selection import StratifiedKFold

    folds = int(cv.get("folds", 5))
    if not 0 <= cv.fold < folds:
        raise ValueError(f"cv.fold={cv.fold}; valid: 0..{folds - 1} (cv.folds={folds})")
    try:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=cv.get("seed", 0))
        train_pos, held_pos = list(splitter.split(indices, train_ids_N[indices]))[cv.fold]
    except ValueError as e:
        raise ValueError(f"cv.folds={folds}: {e}") from None
    return indices[train_pos], indices[held_pos]


def warn_on_imbalance(names, train_ids_N: np.ndarray, eval_ids_N: np.ndarray) -> None:
    """Logs classes absent from training or evaluation (their metrics are 0 / skipped)."""
    for split, ids in (("training", train_ids_N), ("evaluation", eval_ids_N)):
        counts = np.bincount(ids, minlength=len(names))
        absent = [names[c] for c in np.flatnonzero(counts == 0)]
        if absent:
            log.warning("classes absent from the %s split: %s", split, absent)


# ----------------------------------------------------------------------------- task


def load_data(config, cache_dir: str) -> tuple[Any, Any, Any, labels_lib.LabelSpace]:
    """(full train split, train source, eval source, label space), every record checked once.

    The eval source is the validation split, or the held-out fold of a CV run.
    """
    data_cfg = config.data
    num_texts = len(data_lib.split_fields(data_cfg.text_fields, "data.text_fields"))
    allow_empty = bool(data_cfg.get("allow_empty_text", False))
    cv_fold = (config.get("cv") or {}).get("fold")
    splits = data_lib.open_splits(data_cfg, cache_dir, need_validation=cv_fold is None)
    full_train = splits["train"]
    raw_train = labels_lib.read_raw_labels(full_train, num_texts, allow_empty)
    labels = labels_lib.infer_label_space(data_cfg, raw_train, labels_lib.catalog_label_names(full_train))
    all_ids = labels_lib.encode_labels(labels, raw_train, full_train.name)
    train_idx, held_idx = select_examples(config, all_ids)
    if len(train_idx) == 0:
        raise DataError(f"no training examples left in {full_train.name} (data.max_train_examples, cv)")
    train_source = data_lib.SubsetSource(full_train, train_idx, "train")
    if held_idx is None:
        eval_source = splits["validation"]
        eval_raw = labels_lib.read_raw_labels(eval_source, num_texts, allow_empty)
        eval_ids = labels_lib.encode_labels(labels, eval_raw, eval_source.name)
    else:
        eval_source = data_lib.SubsetSource(full_train, held_idx, f"fold {cv_fold}")
        eval_ids = all_ids[held_idx]
    warn_on_imbalance(labels.names, all_ids[train_idx], eval_ids)
    return full_train, train_source, eval_source, labels


def tokenizer_and_encoder(config, workdir: str | None, full_train, cache_dir: str):
    """(tokenizer, EncoderConfig, pretrained or None): resume > pretrained > trained / scratch."""
    from encoder_jax.data import tokenizer as tokenizer_lib

    record = load_model_record(workdir) if workdir else None
    pretrained = pretrained_lib.resolve_pretrained(config) if record is None else None
    if pretrained is not None:
        if config.tokenizer.get("model_file"):
            raise ValueError(f"{pretrained.source} and tokenizer.model_file are both set: the "
                             f"pretrained encoder's tokenizer is used, drop tokenizer.model_file")
        tokenizer = pretrained.tokenizer
        if pretrained.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"{pretrained.source}: encoder vocab {pretrained.config.vocab_size} != "
                             f"tokenizer vocab {tokenizer.vocab_size}")
    else:
        def texts():
            for i in range(len(full_train)):
                yield from (str(v) for k, v in full_train[i].items() if k != "label")

        tokenizer = tokenizer_lib.get_tokenizer(
            config.tokenizer, workdir=workdir, cache_dir=cache_dir,
            corpus_id=f"{full_train!r}", texts=texts)
    if record is not None:
        arch = architecture(config.model, record["encoder"], os.path.join(workdir, MODEL_FILE))
    elif pretrained is not None:
        arch = architecture(config.model, {f: getattr(pretrained.config, f) for f in ARCH_FIELDS},
                            pretrained.source)
    else:
        arch = architecture(config.model, None, "")
    return tokenizer, encoder_config_from(config.model, arch, tokenizer.vocab_size), pretrained


def encoding_config(data_cfg, num_texts: int) -> data_lib.EncodingConfig:
    """How `config.data` turns texts into rows (max length, padded lengths, join / pair)."""
    return data_lib.EncodingConfig(
        max_len=data_cfg.max_len,
        pad_lengths=data_lib.make_pad_lengths(data_cfg.get("pad_lengths"), data_cfg.max_len),
        text_mode=data_cfg.get("text_mode", "join"), num_texts=num_texts,
        join_separator=data_cfg.get("join_separator", " "))


def build(config, workdir: str | None, shard_index: int = 0, shard_count: int = 1):
    """The classification task: data, labels, tokenizer, model, loss and reports from `config`."""
    from encoder_jax import metrics, optim
    from encoder_jax.data import sources, tokenizer as tokenizer_lib
    from encoder_jax.models import BertForClassification
    from encoder_jax.tasks.base import Task

    data_cfg, ft = config.data, config.finetune
    wants_pretrained = pretrained_lib.wants_pretrained(config)  # both init fields set: fails here
    cache_dir = data_cfg.get("data_dir") or sources.default_data_dir()
    full_train, train_source, eval_source, labels = load_data(config, cache_dir)
    tokenizer, model_cfg, pretrained = tokenizer_and_encoder(config, workdir, full_train, cache_dir)
    pooling = config.model.get("pooling", "first")
    num_texts = len(data_lib.split_fields(data_cfg.text_fields, "data.text_fields"))
    encoding = encoding_config(data_cfg, num_texts)
    if encoding.max_len > model_cfg.max_len:
        raise ValueError(f"data.max_len={encoding.max_len} exceeds model.max_len={model_cfg.max_len}")
    if encoding.text_mode == "pair" and model_cfg.type_vocab_size < 2:
        raise ValueError("data.text_mode='pair' needs model.type_vocab_size >= 2")
    if workdir and shard_index == 0:
        os.makedirs(workdir, exist_ok=True)
        if pretrained is not None:
            tokenizer.save(workdir)
        labels_lib.record_label_space(labels, workdir)
        with open(os.path.join(workdir, MODEL_FILE), "w", encoding="utf-8") as f:
            json.dump(model_record(model_cfg, labels.num_classes, pooling), f, indent=2)
    model = BertForClassification(model_cfg, labels.num_classes, pooling)

    global_batch = data_cfg.batch_size
    train_data = data_lib.train_dataset(
        train_source, tokenizer, labels, encoding, global_batch=global_batch, seed=config.seed,
        group=data_cfg.get("length_group", 8), shard_index=shard_index, shard_count=shard_count,
        workers=data_cfg.get("workers", 0), prefetch=data_cfg.get("prefetch", 2))
    example = data_lib.example_batch(global_batch // shard_count, encoding.max_len)
    specials = tuple(int(i) for i in tokenizer_lib.special_ids(tokenizer))
    smoothing = float(ft.get("label_smoothing", 0.0))
    delete_rate, mask_rate = float(ft.get("augment_delete", 0.0)), float(ft.get("augment_mask", 0.0))

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]

    def forward(params, batch, rng, train):
        return model.apply({"params": params}, batch["ids"], segment_ids=batch["segment_ids"],
                           type_ids=batch["type_ids"], deterministic=not train,
                           rngs={"dropout": rng})

    def loss_fn(params, batch, rng, train):
        dropout_rng, augment_rng = jax.random.split(rng)
        if train and (delete_rate > 0 or mask_rate > 0):
            batch = augment_tokens(augment_rng, batch, delete_rate=delete_rate, mask_rate=mask_rate,
                                   mask_id=tokenizer.mask_id, special_ids=specials)
        logits_BxC = forward(params, batch, dropout_rng, train)
        return classification_loss(logits_BxC, batch["label"], batch["weight"],
                                   smoothing if train else 0.0)

    def eval_fn(params, batch, rng):
        logits_BxC = forward(params, batch, rng, False)
        xent_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label"])
        return {"logits": logits_BxC, "label": batch["label"], "weight": batch["weight"],
                "index": batch["index"], "loss": xent_B}

    eval_batch = config.eval.get("batch_size") or global_batch
    cache: dict[str, Any] = {}

    def eval_batches():
        if "examples" not in cache:  # encoded once, reused at every evaluation
            cache["examples"] = data_lib.encode_split(eval_source, tokenizer, labels, encoding)
        return data_lib.eval_batches(cache["examples"], global_batch=eval_batch,
                                     pad_lengths=encoding.pad_lengths, shard_index=shard_index,
                                     shard_count=shard_count)

    def summarize_eval(outputs):
        out = collect_outputs(outputs)
        probs_NxC = softmax(out["logits"])
        report = metrics.classification_report(out["label"], probs_NxC, labels.names, out["loss"])
        cache["last"] = (report, out["label"], probs_NxC)
        return metrics.scalars(report)

    def on_eval(step, summary):
        if workdir and "last" in cache:
            report, labels_N, probs_NxC = cache["last"]
            metrics.write_report({"step": step, **report}, labels_N, probs_NxC,
                                 os.path.join(workdir, REPORT_DIR), f"Evaluation at step {step}")

    def on_best(step, summary):
        if workdir and os.path.isdir(os.path.join(workdir, REPORT_DIR)):
            shutil.copytree(os.path.join(workdir, REPORT_DIR), os.path.join(workdir, BEST_REPORT_DIR),
                            dirs_exist_ok=True)

    rule = ft.get("trainable", "all")
    optim.trainable_mask(jax.eval_shape(init_params, jax.random.key(0)), rule)  # fail early on bad rules
    decay = ft.get("layer_lr_decay")

    def init_from(params):
        source = pretrained or pretrained_lib.resolve_pretrained(config)
        return pretrained_lib.graft_encoder(params, source.load_params(), source.source)
    return Task(
        name="classify", init_params=init_params, loss_fn=loss_fn, train_data=train_data,
        example_batch=example, summarize=summarize, eval_batches=eval_batches,
        tokens_in_batch=lambda b: int((b["segment_ids"] > 0).sum()),
        trainable=None if rule == "all" else (lambda p: optim.trainable_mask(p, rule)),
        init_from=init_from if wants_pretrained else None,
        on_eval=on_eval, eval_fn=eval_fn, summarize_eval=summarize_eval,
        on_best=on_best,
        lr_scale=optim.layer_lr_decay_scale(decay, model_cfg.num_layers) if decay and decay != 1.0 else None,
        artifacts=(type(tokenizer).FILENAME, MODEL_FILE, labels_lib.LABELS_FILE))


# ----------------------------------------------------------------------------- predict


def predict(config, workdir: str, params: Any) -> str:
    """Labels `predict.input` with the run's model; writes jsonl (label, probabilities); returns its path."""
    from tqdm import tqdm

    from encoder_jax.data import tokenizer as tokenizer_lib

    pred_cfg = config.predict
    if not pred_cfg.get("input"):
        raise ValueError("--mode predict needs --config.predict.input=FILE (csv, tsv or jsonl)")
    record = load_model_record(workdir)
    if record is None:
        raise FileNotFoundError(f"{workdir!r} has no {MODEL_FILE}: train a classification run there first")
    labels = labels_lib.load_label_space(workdir)
    tokenizer = tokenizer_lib.load_saved(workdir, config.tokenizer.get("word_segmenter", "auto"))
    fields = data_lib.split_fields(pred_cfg.get("text_fields") or config.data.text_fields,
                                   "predict.text_fields")
    has_header = pred_cfg.get("has_header")
    rows = data_lib.read_prediction_rows(pred_cfg.input, fields, config.data.get("has_header", False)
                                if has_header is None else has_header)
    output = pred_cfg.get("output") or os.path.join(workdir, "predictions.jsonl")
    encoding = encoding_config(config.data, len(fields))
    model = build_model(record)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b["ids"], segment_ids=b["segment_ids"],
                                             type_ids=b["type_ids"]))
    examples = [{"ids": ids, "type_ids": types, "label": -1, "index": i}
                for i, (ids, types) in enumerate(data_lib.encode_texts(tokenizer, texts, encoding)
                                                 for texts in rows)]
    batches = data_lib.eval_batches(examples, global_batch=pred_cfg.get("batch_size", 64),
                                    pad_lengths=encoding.pad_lengths)
    results: dict[int, np.ndarray] = {}
    total = -(-len(examples) // pred_cfg.get("batch_size", 64))
    for batch in tqdm(batches, total=total, desc="predict", unit="batch"):
        probs_BxC = softmax(jax.device_get(apply(params, batch)))
        for row, index in enumerate(batch["index"]):
            if batch["weight"][row] > 0:
                results[int(index)] = probs_BxC[row]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        for index in range(len(examples)):
            probs_C = results[index]
            best = int(probs_C.argmax())
            f.write(json.dumps({"index": index, "label": labels.names[best], "label_id": best,
                                "probabilities": {n: round(float(p), 6) for n, p in zip(labels.names, probs_C)},
                                "empty": not any(t.strip() for t in rows[index])},
                               ensure_ascii=False) + "\n")
    log.info("wrote %d predictions to %s", len(examples), output)
    return output
