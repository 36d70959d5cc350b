"""Text classification: encoder + pooled head, label smoothing, exact whole-split metrics.

Initialisation precedence (train.run): resume from the workdir > `config.init_from`
(another run's workdir) or `config.init_from_hf` (a Hugging Face BERT directory): its
encoder params, tokenizer and model shape, the head fresh; setting both is an error >
fresh. Pretrained encoders come through `encoder_jax.pretrained`.

Model shape: `model.<arch field>` set explicitly > the pretrained run's (or, on
resume, the workdir's `model.json`) > `model.scratch`. An explicit value that
disagrees with the pretrained or recorded shape is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from encoder_jax import baselines, config_types, configs, errors, metrics, optim, pretrained as pretrained_lib
from encoder_jax import reporting, wide as wide_lib
from encoder_jax import workdir as workdir_lib
from encoder_jax.data import batching, classification as data_lib, labels as labels_lib
from encoder_jax.data import sources, tokenizer as tokenizer_lib
from encoder_jax.data.sources import DataError
from encoder_jax.data.text import special_ids
from encoder_jax.layers import EncoderConfig
from encoder_jax.models import BertForClassification
from encoder_jax.tasks.base import Task, stateless

log = logging.getLogger("encoder_jax")

ARCH_FIELDS = ("hidden_dim", "num_layers", "num_heads", "mlp_dim", "max_len", "type_vocab_size",
               "activation", "layer_norm_eps", "pre_norm", "use_pooler", "bigram_buckets")
TASK_MODEL_FIELDS = ("pooling", "wide_buckets", "wide_chars", "scratch")  # config.model keys that are not the encoder's


# ----------------------------------------------------------------------------- model shape


def architecture(model_cfg, recorded: dict[str, Any] | None, recorded_from: str) -> dict[str, Any]:
    """Arch fields: explicit > recorded (pretrained / model.json) > model.scratch > defaults."""
    given = configs.to_dict(model_cfg)
    explicit = {f: given[f] for f in ARCH_FIELDS if given.get(f) is not None}
    if recorded is None:
        defaults = {f.name: f.default for f in dataclasses.fields(EncoderConfig) if f.name in ARCH_FIELDS}
        return {**defaults, **configs.to_dict(given.get("scratch")), **explicit}
    for field, value in explicit.items():
        if recorded.get(field) != value:
            raise errors.ConfigError(f"model.{field}={value!r} but {recorded_from} has {field}="
                                     f"{recorded.get(field)!r}: drop the override (the shape comes from there)")
    return {f: recorded[f] for f in ARCH_FIELDS}


def model_record(cfg: EncoderConfig, num_classes: int, model_cfg, workdir=None) -> workdir_lib.ModelRecord:
    """What predict needs to rebuild the model; on resume the wide part must match `workdir`'s."""
    wide = {"wide_buckets": config_types.check_type("model.wide_buckets", model_cfg.get("wide_buckets") or 0, int),
            "wide_chars": config_types.check_type("model.wide_chars", model_cfg.get("wide_chars") or False, bool)}
    recorded = workdir_lib.read_model_record(workdir) if workdir else None
    if wide["wide_buckets"] < 0:
        raise errors.ConfigError(f"model.wide_buckets={wide['wide_buckets']}; valid: 0 (off) or a bucket count")
    for field, value in wide.items():  # records written before a field hold its off value
        before = recorded.fields.get(field, type(value)()) if recorded else value
        if before != value:
            raise errors.ConfigError(f"model.{field}={value}; valid: {before}, as in the resumed {workdir}")
    if wide["wide_chars"] and not wide["wide_buckets"]:
        raise errors.ConfigError("model.wide_chars=True needs model.wide_buckets > 0 (its table size)")
    return workdir_lib.ModelRecord("classify", cfg, {
        "num_classes": num_classes, "pooling": model_cfg.pooling, **wide})


def build_model(record: workdir_lib.ModelRecord) -> BertForClassification:
    """BertForClassification from a run's model record (records before `wide_buckets` have none)."""
    return BertForClassification(record.encoder, **record.fields)


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


# ----------------------------------------------------------------------------- task


def load_data(data_cfg: configs.ClassifyDataConfig, cv: configs.CvConfig, cache_dir: str
              ) -> tuple[Any, Any, Any, labels_lib.LabelSpace]:
    """(full train split, train source, eval source, label space), every record checked once.

    The eval source is the validation split, or the held-out fold of a CV run.
    """
    num_texts = len(data_lib.split_fields(data_cfg.text_fields, "data.text_fields"))
    if not data_cfg.label_field:
        raise DataError("data.label_field is not set: classification needs labelled data")
    splits = data_lib.open_splits(data_cfg, cache_dir, need_validation=cv.fold is None)
    full_train = splits["train"]
    raw_train = labels_lib.read_raw_labels(full_train, num_texts, data_cfg.allow_empty_text)
    labels = labels_lib.infer_label_space(data_cfg, raw_train, labels_lib.catalog_label_names(full_train))
    all_ids = labels_lib.encode_labels(labels, raw_train, full_train.name)
    train_idx, held_idx = labels_lib.select_examples(data_cfg, cv, all_ids)
    if len(train_idx) == 0:
        raise DataError(f"no training examples left in {full_train.name} (data.max_train_examples, cv)")
    train_source = data_lib.SubsetSource(full_train, train_idx, "train")
    if held_idx is None:
        eval_source = splits["validation"]
        eval_raw = labels_lib.read_raw_labels(eval_source, num_texts, data_cfg.allow_empty_text)
        eval_ids = labels_lib.encode_labels(labels, eval_raw, eval_source.name)
    else:
        eval_source = data_lib.SubsetSource(full_train, held_idx, f"fold {cv.fold}")
        eval_ids = all_ids[held_idx]
    labels_lib.warn_on_imbalance(labels.names, all_ids[train_idx], eval_ids)
    return full_train, train_source, eval_source, labels


def tokenizer_and_encoder(config, workdir: str | None, full_train, cache_dir: str):
    """(tokenizer, EncoderConfig, pretrained or None): resume > pretrained > trained / scratch."""
    tok_cfg = configs.section(configs.TokenizerConfig, config.tokenizer, "tokenizer")
    record = workdir_lib.read_model_record(workdir) if workdir else None
    pretrained = pretrained_lib.resolve(config) if record is None else None
    if pretrained is not None:
        if tok_cfg.model_file:
            raise errors.ConfigError(f"{pretrained.source} and tokenizer.model_file are both set: the "
                                     f"pretrained encoder's tokenizer is used, drop tokenizer.model_file")
        tokenizer = pretrained.tokenizer
        if pretrained.config.vocab_size != tokenizer.vocab_size:
            raise errors.ConfigError(f"{pretrained.source}: encoder vocab {pretrained.config.vocab_size} != "
                                     f"tokenizer vocab {tokenizer.vocab_size}")
    else:
        def texts():
            for i in range(len(full_train)):
                yield from (str(v) for k, v in full_train[i].items() if k != "label")

        tokenizer = tokenizer_lib.get_tokenizer(tok_cfg, workdir=workdir, cache_dir=cache_dir,
                                                corpus_id=f"{full_train!r}", texts=texts)
    if record is not None:
        arch = architecture(config.model, record.encoder.to_json(),
                            workdir_lib.path(workdir, workdir_lib.MODEL_FILE))
    elif pretrained is not None:
        arch = architecture(config.model, {f: getattr(pretrained.config, f) for f in ARCH_FIELDS},
                            pretrained.source)
    else:
        arch = architecture(config.model, None, "")
    model_cfg = EncoderConfig.from_config(config.model, tokenizer.vocab_size,
                                          ignore=TASK_MODEL_FIELDS, **arch)
    return tokenizer, model_cfg, pretrained


def encoding_config(data_cfg: configs.ClassifyDataConfig, num_texts: int) -> data_lib.EncodingConfig:
    """How `config.data` turns texts into rows (max length, padded lengths, join / pair)."""
    return data_lib.EncodingConfig(
        max_len=data_cfg.max_len,
        pad_lengths=batching.make_pad_lengths(data_cfg.pad_lengths, data_cfg.max_len),
        text_mode=data_cfg.text_mode, num_texts=num_texts, join_separator=data_cfg.join_separator)


def check_shape(encoding: data_lib.EncodingConfig, model_cfg: EncoderConfig) -> None:
    if encoding.max_len > model_cfg.max_len:
        raise errors.ConfigError(f"data.max_len={encoding.max_len} exceeds model.max_len={model_cfg.max_len}")
    if encoding.text_mode == "pair" and model_cfg.type_vocab_size < 2:
        raise errors.ConfigError("data.text_mode='pair' needs model.type_vocab_size >= 2")


def model_functions(model: BertForClassification, ft: configs.FinetuneConfig, tokenizer):
    """(init_params, loss(params, batch, rng, train), eval_fn) of the classifier."""
    specials = tuple(int(i) for i in special_ids(tokenizer))

    def init_params(rng):
        params = model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
        return (wide_lib.fill_char_index(params, tokenizer, specials, model.wide_buckets)
                if model.wide_chars else params)

    def forward(params, batch, rng, train, return_parts=False):
        return model.apply({"params": params}, batch["ids"], segment_ids=batch["segment_ids"],
                           type_ids=batch["type_ids"], deterministic=not train,
                           rngs={"dropout": rng}, return_parts=return_parts)

    def loss(params, batch, rng, train):
        (dropout_rng, augment_rng), smoothing = jax.random.split(rng), ft.label_smoothing if train else 0.0
        if train and (ft.augment_delete > 0 or ft.augment_mask > 0):
            batch = augment_tokens(augment_rng, batch, delete_rate=ft.augment_delete,
                                   mask_rate=ft.augment_mask, mask_id=tokenizer.mask_id,
                                   special_ids=specials)
        xent = lambda z_BxC: classification_loss(z_BxC, batch["label"], batch["weight"], smoothing)
        if not (train and model.wide_buckets and ft.wide_loss == "separate"):
            return xent(forward(params, batch, dropout_rng, train))
        # Each part learns to classify alone (no co-adaptation); predictions use their sum.
        deep_BxC, wide_BxC = forward(params, batch, dropout_rng, train, return_parts=True)
        return xent(deep_BxC)[0] + xent(wide_BxC)[0], xent(deep_BxC + wide_BxC)[1]

    def eval_fn(params, model_state, batch, rng):
        del model_state
        logits_BxC = forward(params, batch, rng, False)
        xent_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label"])
        return {"logits": logits_BxC, "label": batch["label"], "weight": batch["weight"],
                "index": batch["index"], "loss": xent_B}

    return init_params, loss, eval_fn


def evaluation_hooks(workdir: str | None, eval_source, tokenizer, labels, encoding, eval_rows: int,
                     shard_index: int, shard_count: int) -> dict[str, Any]:
    """eval_batches, summarize_eval (scikit-learn report), on_eval and on_best (report files)."""
    cache: dict[str, Any] = {}

    def eval_batches():
        if "examples" not in cache:  # encoded once, reused at every evaluation
            cache["examples"] = data_lib.encode_split(eval_source, tokenizer, labels, encoding)
        return batching.eval_batches(cache["examples"], global_batch=eval_rows,
                                     pad_lengths=encoding.pad_lengths, shard_index=shard_index,
                                     shard_count=shard_count)

    def summarize_eval(outputs):
        out = metrics.collect_outputs(outputs)
        probs_NxC = metrics.softmax(out["logits"])
        report = metrics.classification_report(out["label"], probs_NxC, labels.names, out["loss"])
        cache["last"] = (report, out["label"], probs_NxC)
        return metrics.scalars(report)

    def on_eval(step, summary, state=None):
        if workdir and "last" in cache:
            report, labels_N, probs_NxC = cache["last"]
            metrics.write_report({"step": step, **report}, labels_N, probs_NxC,
                                 workdir_lib.path(workdir, workdir_lib.REPORT_DIR),
                                 f"Evaluation at step {step}")

    def on_best(step, summary):
        report_dir = workdir_lib.path(workdir, workdir_lib.REPORT_DIR) if workdir else None
        if report_dir and os.path.isdir(report_dir):
            shutil.copytree(report_dir, workdir_lib.path(workdir, workdir_lib.BEST_REPORT_DIR),
                            dirs_exist_ok=True)

    return dict(eval_batches=eval_batches, summarize_eval=summarize_eval, on_eval=on_eval,
                on_best=on_best)


def build(config, workdir: str | None, shard_index: int = 0, shard_count: int = 1) -> Task:
    """The classification task: data, labels, tokenizer, model, loss and reports from `config`."""
    data_cfg = configs.section(configs.ClassifyDataConfig, config.data, "data")
    ft = configs.section(configs.FinetuneConfig, config.finetune, "finetune")
    eval_cfg = configs.section(configs.EvalConfig, config.eval, "eval")
    wants_pretrained = pretrained_lib.wants_pretrained(config)  # both init fields set: fails here
    cache_dir = data_cfg.data_dir or sources.default_data_dir()
    full_train, train_source, eval_source, labels = load_data(
        data_cfg, configs.section(configs.CvConfig, config.get("cv"), "cv"), cache_dir)
    tokenizer, model_cfg, pretrained = tokenizer_and_encoder(config, workdir, full_train, cache_dir)
    record = model_record(model_cfg, labels.num_classes, config.model, workdir)
    encoding = encoding_config(data_cfg, len(data_lib.split_fields(data_cfg.text_fields, "data.text_fields")))
    check_shape(encoding, model_cfg)
    if workdir and shard_index == 0:
        os.makedirs(workdir, exist_ok=True)
        if pretrained is not None:
            tokenizer.save(workdir)
        workdir_lib.record_label_space(workdir, labels)
        workdir_lib.write_model_record(workdir, record)
    model = build_model(record)
    train_data = data_lib.train_dataset(
        train_source, tokenizer, labels, encoding, global_batch=data_cfg.batch_size,
        seed=config.seed, group=data_cfg.length_group, shard_index=shard_index,
        shard_count=shard_count, workers=data_cfg.workers, prefetch=data_cfg.prefetch)
    init_params, loss, eval_fn = model_functions(model, ft, tokenizer)
    optim.trainable_mask(jax.eval_shape(init_params, jax.random.key(0)), ft.trainable)  # fail early

    def init_from(params):
        grafted = pretrained_lib.graft_encoder(params, pretrained or pretrained_lib.resolve(config))
        return pretrained_lib.reinit_top_blocks(grafted, params, ft.reinit_top_layers)

    decay, wide = ft.layer_lr_decay, record.fields["wide_buckets"] and ft.wide_lr_scale != 1.0
    return Task(
        name="classify", init_params=init_params, loss_fn=stateless(loss), train_data=train_data,
        example_batch=data_lib.example_batch(data_cfg.batch_size // shard_count, encoding.max_len),
        summarize=metrics.means, tokens_in_batch=lambda b: int((b["segment_ids"] > 0).sum()),
        trainable=None if ft.trainable == "all" else (
            lambda p: optim.trainable_mask(p, ft.trainable)),
        init_from=init_from if wants_pretrained else None, eval_fn=eval_fn,
        lr_scale=optim.product_of_scales(
            optim.layer_lr_decay_scale(decay, model_cfg.num_layers) if decay and decay != 1.0 else None,
            optim.prefix_lr_scale("wide_", ft.wide_lr_scale) if wide else None,
            optim.prefix_lr_scale("wide_char_index", 0.0) if model.wide_chars else None),  # a table
        batch_rows={"data.batch_size": data_cfg.batch_size // shard_count,
                    "eval.batch_size": (eval_cfg.batch_size or data_cfg.batch_size) // shard_count},
        **evaluation_hooks(workdir, eval_source, tokenizer, labels, encoding,
                           eval_cfg.batch_size or data_cfg.batch_size, shard_index, shard_count))


# ----------------------------------------------------------------------------- baseline


def baseline(config, workdir: str) -> dict[str, Any]:
    """--mode baseline: TF-IDF + linear model on the rows a fine-tuning run with `config` uses."""
    data_cfg = configs.section(configs.ClassifyDataConfig, config.data, "data")
    cv = configs.section(configs.CvConfig, config.get("cv"), "cv")
    _, train_source, eval_source, labels = load_data(data_cfg, cv, data_cfg.data_dir or sources.default_data_dir())
    keys = labels_lib.text_keys(len(data_lib.split_fields(data_cfg.text_fields, "data.text_fields")))

    def texts_and_label_ids(source) -> tuple[list[str], np.ndarray]:  # joined text fields, class ids
        records = [source[i] for i in range(len(source))]
        return ([data_cfg.join_separator.join(str(r[k]) for k in keys) for r in records],
                labels_lib.encode_labels(labels, [r["label"] for r in records], source.name))

    (train_x, train_y), (eval_x, eval_y) = map(texts_and_label_ids, (train_source, eval_source))
    report, probs = baselines.fit_and_evaluate(train_x, train_y, eval_x, eval_y, labels.names,
                                               config.get("baseline"))
    metrics.write_report(report, eval_y, probs, workdir_lib.path(workdir, workdir_lib.BASELINE_DIR),
                         f"Baseline: TF-IDF ({report['features']}) + {report['model']}")
    return report


# ----------------------------------------------------------------------------- predict


def predict(config, run: workdir_lib.TrainedRun) -> str:
    """Labels `predict.input` with the run's model; writes jsonl (label, probabilities); returns its path."""
    from tqdm import tqdm

    if run.record.task != "classify" or run.labels is None:
        raise errors.MissingFileError(f"{run.workdir!r} holds no classification run ({workdir_lib.MODEL_FILE} "
                                      f"task={run.record.task!r}): train a classification run there first")
    pred_cfg = configs.section(configs.PredictConfig, config.predict, "predict")
    fields, rows = data_lib.predict_rows(config.data, pred_cfg)
    output = pred_cfg.output or workdir_lib.path(run.workdir, workdir_lib.PREDICTIONS_FILE)
    encoding = encoding_config(configs.section(configs.ClassifyDataConfig, config.data, "data"), len(fields))
    model = build_model(run.record)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b["ids"], segment_ids=b["segment_ids"],
                                             type_ids=b["type_ids"]))
    examples = [{"ids": ids, "type_ids": types, "label": -1, "index": i}
                for i, (ids, types) in enumerate(data_lib.encode_texts(run.tokenizer, texts, encoding)
                                                 for texts in rows)]
    batches = batching.eval_batches(examples, global_batch=pred_cfg.batch_size,
                                    pad_lengths=encoding.pad_lengths)
    results: dict[int, np.ndarray] = {}
    total = -(-len(examples) // pred_cfg.batch_size)
    for batch in tqdm(batches, total=total, desc="predict", unit="batch"):
        probs_BxC = metrics.softmax(jax.device_get(apply(run.params, batch)))
        for row, index in enumerate(batch["index"]):
            if batch["weight"][row] > 0:
                results[int(index)] = probs_BxC[row]
    return reporting.write_predictions(run.labels.names, [results[i] for i in range(len(examples))],
                                       rows, output)
