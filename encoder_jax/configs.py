"""The config boundary: every config section the library reads, as a frozen dataclass.

Experiment files (`experiments/*.py`, ml_collections) may set any field; the
defaults live here and nowhere else. `section(cls, value, name)` reads one
section once, at the top of the code that owns it, and hands the dataclass
down; a ConfigDict, a dict or an instance of `cls` are all accepted, so a
notebook can pass either. An unknown key or a value of the wrong type is a
one-line error naming the field and the valid choices.

The model section is read by `layers.EncoderConfig.from_config` (the model's own fields).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from encoder_jax import errors
from encoder_jax.config_types import check_type, field_types, to_dict  # noqa: F401  (to_dict re-exported)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class FilesConfig:
    """Local data files: comma-separated paths or globs (.gz ok); None: not given."""

    train: str | None = None
    validation: str | None = None


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    """`data` of MLM pretraining: a corpus of documents packed into rows."""

    name: str | None = "python_docs"  # built-in corpus or a TFDS catalog name
    files: FilesConfig = FilesConfig()  # local files; override name
    format: str = "auto"  # auto | lines | paragraphs | wikiextractor | csv | tsv
    text_column: str = "0"  # csv/tsv: header name or 0-based index; "1,2": cells joined
    has_header: bool = False
    text_field: str = "text"  # field of TFDS catalog records
    train_split: str = "train"
    eval_split: str = "validation"
    data_dir: str | None = None  # prepared-data cache; None: $ENCODER_JAX_DATA_DIR or ~/.cache
    seq_len: int = 128  # tokens per packed row
    batch_size: int = 32  # global rows per optimizer step
    workers: int = 0  # grain worker processes (0: the main process)
    prefetch: int = 2  # batches buffered per worker


@dataclasses.dataclass(frozen=True)
class ClassifyDataConfig:
    """`data` of text classification: labelled records, padded to a few lengths."""

    name: str | None = None  # without files: built-in toy_topics or a TFDS catalog name
    train_split: str = "train"
    eval_split: str = "test"
    files: FilesConfig = FilesConfig()
    format: str = "auto"  # auto | csv | tsv
    has_header: bool = False
    text_fields: str = "text"  # comma-separated header names or 0-based indices
    text_mode: str = "join"  # join | pair
    join_separator: str = " "
    label_field: str | None = "label"  # None: unlabelled (topic models; classification needs one)
    label_format: str = "auto"  # auto | index | name
    label_base: int = 0  # integer labels start here
    classes_file: str | None = None
    num_classes: int | None = None  # integer labels without names; None: max + 1
    allow_empty_text: bool = False
    max_train_examples: int | None = None  # a fixed random subset; None: all
    subset_seed: int = 0
    max_len: int = 128  # tokens per row incl. [CLS]/[SEP]
    pad_lengths: tuple[int, ...] = (32, 48, 64, 96, 128)
    length_group: int = 8  # batches per length-sorted window
    batch_size: int = 32
    data_dir: str | None = None
    workers: int = 0
    prefetch: int = 2


@dataclasses.dataclass(frozen=True)
class TranslationDataConfig:
    """`data` of translation: sentence pairs, batched by a token budget over a few padded lengths."""

    name: str | None = None  # without files: built-in zh_en_numbers or a TFDS catalog name
    files: FilesConfig = FilesConfig()  # local csv/tsv(.gz) pairs; override name
    format: str = "auto"  # auto (.csv: csv, else tsv) | csv | tsv
    has_header: bool = False
    source_column: str = "1"  # csv/tsv: header name or 0-based index; Tatoeba rows are
    target_column: str = "0"  # english<TAB>chinese<TAB>attribution, so zh->en reads 1 -> 0
    source_field: str = "zh"  # fields of TFDS catalog records (wmt19_translate/zh-en: zh, en)
    target_field: str = "en"
    train_split: str = "train"
    eval_split: str = "validation"
    data_dir: str | None = None  # prepared-data cache; None: $ENCODER_JAX_DATA_DIR or ~/.cache
    max_len: int = 64  # tokens per side incl. BOS/EOS; longer training pairs are dropped (counted)
    pad_lengths: tuple[int, ...] = (16, 32, 48, 64)  # allowed padded lengths; max_len is added
    max_tokens: int = 4096  # token budget per global batch: rows x padded length
    batch_multiple: int = 8  # rows per batch are a multiple of this (shards over devices)
    window: int = 4096  # examples per length-sorting window
    max_train_examples: int | None = None  # the first N training pairs; None: all
    max_eval_examples: int | None = None  # the first N evaluation pairs; None: all
    workers: int = 0  # grain worker processes (0: the main process)
    prefetch: int = 2  # batches buffered per worker


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """`tokenizer`: a file to load, or how to train a sentencepiece model."""

    model_file: str | None = None  # a sentencepiece .model; None: train one
    vocab_file: str | None = None  # a WordPiece vocab.txt; wins over model_file
    model_type: str = "unigram"  # unigram | bpe
    vocab_size: int = 8000
    character_coverage: float = 0.9995
    max_sentences: int = 300_000  # lines sampled to train the tokenizer
    word_segmenter: str = "auto"  # auto | whitespace | jieba


@dataclasses.dataclass(frozen=True)
class TranslationTokenizerConfig(TokenizerConfig):
    """`tokenizer` of translation: one joint sentencepiece model, or one per side."""

    joint: bool = True  # one model over source and target text (needed for shared embeddings)
    target_vocab_size: int | None = None  # separate target model; None: vocab_size
    target_model_file: str | None = None  # a sentencepiece .model for the target side


@dataclasses.dataclass(frozen=True)
class TranslateConfig:
    """`translate`: the loss and how translations are decoded (in evaluation and predict)."""

    label_smoothing: float = 0.1
    beam_size: int = 4  # --mode predict (1: greedy)
    eval_beam_size: int = 4  # in-loop evaluation (1: greedy, faster)
    length_penalty: float = 0.6  # GNMT alpha: score = log p / ((5 + length) / 6) ** alpha
    max_len_a: int = 10  # generated tokens <= a + b * source tokens (and <= data.max_len)
    max_len_b: float = 1.5
    samples: int = 10  # source / reference / hypothesis triples written per evaluation
    eval_batch_size: int = 64  # sentences per decoding batch (a multiple of the device count)
    cache_blocks: int = 8  # decode-cache blocks, one loop each: less cache read, longer compile


@dataclasses.dataclass(frozen=True)
class MaskedLmConfig:
    """`mlm`: which tokens are predicted and how they are corrupted."""

    rate: float = 0.15
    max_predictions: int | None = None  # slots per row; None: ceil(rate * seq_len) + 1
    whole_word: bool = False
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    objective: str = "mlm"  # mlm | electra (replaced-token detection with a small generator)
    generator_layers: int = 1  # electra: the generator's blocks (the discriminator's width)
    rtd_weight: float = 50.0  # electra: weight of the detection loss beside the generator's MLM loss
    embedding_init: str = "random"  # random | ppmi: token table from corpus co-occurrence (PPMI-SVD)
    ppmi_window: int = 10  # ppmi: tokens either side that co-occur
    ppmi_docs: int = 200_000  # ppmi: training documents counted (evenly spaced over the corpus)
    ppmi_std: float = 1.0  # ppmi: standard deviation the table is scaled to


@dataclasses.dataclass(frozen=True)
class TopicsConfig:
    """`topics`: clusters of documents (GMM on embeddings) and the document VAE / VaDE."""

    num_topics: int = 4  # K: mixture components (GMM, VaDE clusters)
    k_range: str | None = None  # GMM: "2-12" fits each K and keeps the lowest BIC; None: num_topics
    covariance: str = "diag"  # GMM covariance: full | diag | spherical
    n_init: int = 3  # GMM restarts (k-means++), the best log-likelihood kept
    max_iter: int = 200
    tol: float = 1e-4  # EM stops when the mean log-likelihood gains less
    reg_covar: float = 1e-5  # added to covariance diagonals
    pooling: str = "mean"  # embeddings: cls | mean (of the last layer's real tokens)
    normalize: str = "l2"  # embeddings: none | l2 | whiten (PCA whitening fitted on the train split)
    max_fit_docs: int = 20_000  # train documents the GMM (or VaDE prior) is fitted on
    latent_dim: int = 32  # VAE latent size = number of latent topics
    hidden_dim: int = 256  # VAE inference MLP width (two layers)
    prior: str = "normal"  # VAE prior: normal | mixture (VaDE, K = num_topics)
    pretrain_steps: int = 0  # VaDE: plain-VAE steps before the mixture prior is fitted
    kl_warmup_steps: int = 500  # KL weight rises linearly 0 -> 1 over these steps
    dropout_rate: float = 0.2
    min_df: int = 2  # bag of words: tokens in fewer train documents are left out
    max_df: float = 0.5  # ... and tokens in more than this fraction of them (stop words)
    bigram_buckets: int = 0  # VAE: also hashed bigrams of adjacent tokens, in this many buckets
    top_words: int = 10  # per topic / cluster, reported and scored for NPMI coherence


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """`finetune`: what trains and how the classification loss is regularised."""

    trainable: str = "all"  # all | head | top:K | re:<regex>
    layer_lr_decay: float | None = None  # None: off
    label_smoothing: float = 0.0
    augment_delete: float = 0.0  # token deletion probability (training only)
    augment_mask: float = 0.0  # [MASK] replacement probability
    reinit_top_layers: int = 0  # pretrained runs: fresh weights for the top K blocks and the pooler
    wide_lr_scale: float = 100.0  # learning-rate factor of the wide n-gram tables (model.wide_buckets)
    wide_loss: str = "joint"  # joint: one loss on deep + wide logits | separate: one loss per part


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """`opt`: optimizer, learning-rate schedule, clipping and accumulation."""

    name: str = "adamw"
    learning_rate: float = 1e-3  # peak
    schedule: str = "linear"  # decay after warmup: constant | linear | cosine | rsqrt
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0  # decoupled (adamw / lamb / lion / adafactor)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    momentum: float = 0.9  # momentum / nesterov / rmsprop (0: none)
    rms_decay: float = 0.9
    grad_clip_norm: float = 0.0  # 0: no clipping
    grad_accum_steps: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`train`: how long, how often to log, and the MFU reference."""

    num_steps: int = 1000
    log_every: int = 50
    max_steps_per_run: int | None = None  # checkpoint and exit after this many; None: to the end
    peak_flops_per_device: float | None = None  # None: measured matmul peak
    time_budget: float | None = None  # minutes of training; the LR schedule runs on elapsed time
    cpu_scheduler: str = "memory"  # XLA:CPU step order: memory (least peak memory) | concurrency


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """`baseline`: the TF-IDF + linear model a fine-tuned classifier must beat (--mode baseline)."""

    features: str = "auto"  # auto (char for CJK text, else word) | word (1-2 grams) | char (1-3)
    model: str = "svm"  # svm (linear SVM) | logreg (logistic regression)
    C: float = 1.0  # inverse regularisation strength
    max_features: int | None = None  # vocabulary cap; None: every n-gram seen in training


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """`ckpt`: periodic Orbax checkpoints."""

    every_steps: int = 1000
    keep: int = 3
    use_async: bool = True
    average_last: int = 0  # at the end, average the last N checkpoints' params (<= keep); 0: off


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`eval`: how often, on how much, and which metric keeps the best checkpoint."""

    every_steps: int = 1000
    batch_size: int | None = None  # None: data.batch_size
    max_batches: int | None = None  # None: the whole split
    best_metric: str | None = None  # None: no best checkpoint
    best_mode: str = "auto"  # auto | max | min
    early_stop_patience: int = 0  # 0: never stop early


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`mesh`: devices on the parameter-sharding axis; the rest are data-parallel."""

    fsdp: int = 1  # -1: all devices
    min_shard_size: int = 2 ** 14  # smaller arrays stay replicated


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """`predict`: --mode predict's input and output."""

    input: str | None = None
    output: str | None = None  # None: <workdir>/predictions.jsonl
    text_fields: str | None = None  # None: data.text_fields
    has_header: bool | None = None  # None: data.has_header
    batch_size: int = 64
    nbest: int = 1  # translation: hypotheses per sentence in the jsonl output (<= beam size)
    artifact: str | None = None  # classification: an export (--mode export) to predict with instead


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """`sweep`: --mode sweep's grid."""

    grid: str = "{}"  # JSON {"dotted.field": [values, ...]}
    index: int | None = None  # run only this index; None: all
    repeats: int = 1
    metric: str | None = None  # None: eval.best_metric
    baseline: bool = False  # also fit the task's linear baseline (--mode baseline) on each run's rows
    curve: str | None = None  # a grid field: curve.png of the metric against it (log x), one line
    #                           per setting of the other fields, the baseline beside them


@dataclasses.dataclass(frozen=True)
class CvConfig:
    """`cv`: stratified k-fold cross-validation."""

    folds: int = 5
    fold: int | None = None  # set per run by --mode cv; None: the validation split
    seed: int = 0


# Lower bounds (inclusive) of numeric fields; None values are left alone.
MINIMUMS: dict[type, dict[str, float]] = {
    TextDataConfig: {"seq_len": 8, "batch_size": 1, "workers": 0, "prefetch": 1},
    ClassifyDataConfig: {"batch_size": 1, "max_len": 3, "length_group": 1, "workers": 0,
                         "prefetch": 1, "max_train_examples": 1, "num_classes": 2},
    FinetuneConfig: {"label_smoothing": 0.0, "augment_delete": 0.0, "augment_mask": 0.0,
                     "reinit_top_layers": 0, "wide_lr_scale": 0.0},
    MaskedLmConfig: {"generator_layers": 1, "rtd_weight": 0.0, "ppmi_window": 1, "ppmi_docs": 1,
                     "ppmi_std": 1e-6},
    TranslationDataConfig: {"max_len": 3, "max_tokens": 1, "batch_multiple": 1, "window": 1,
                            "max_train_examples": 1, "max_eval_examples": 1, "workers": 0,
                            "prefetch": 1},
    TokenizerConfig: {"vocab_size": 8, "character_coverage": 0.5, "max_sentences": 1},
    TranslationTokenizerConfig: {"vocab_size": 8, "target_vocab_size": 8,
                                 "character_coverage": 0.5, "max_sentences": 1},
    TranslateConfig: {"label_smoothing": 0.0, "beam_size": 1, "eval_beam_size": 1,
                      "max_len_a": 0, "max_len_b": 0.0, "samples": 0, "eval_batch_size": 1,
                      "cache_blocks": 1},
    OptConfig: {"learning_rate": 0.0, "warmup_steps": 0, "end_lr_fraction": 0.0,
                "weight_decay": 0.0, "eps": 0.0, "grad_clip_norm": 0.0, "grad_accum_steps": 1},
    TrainConfig: {"num_steps": 1, "log_every": 1, "max_steps_per_run": 1, "time_budget": 0.0},
    BaselineConfig: {"C": 0.0, "max_features": 1},
    CheckpointConfig: {"every_steps": 1, "keep": 1, "average_last": 0},
    EvalConfig: {"every_steps": 1, "batch_size": 1, "max_batches": 1, "early_stop_patience": 0},
    PredictConfig: {"batch_size": 1, "nbest": 1},
    TopicsConfig: {"num_topics": 1, "n_init": 1, "max_iter": 1, "tol": 0.0, "reg_covar": 0.0,
                   "max_fit_docs": 1, "latent_dim": 1, "hidden_dim": 1, "pretrain_steps": 0,
                   "kl_warmup_steps": 0, "dropout_rate": 0.0, "min_df": 1, "max_df": 0.0,
                   "bigram_buckets": 0, "top_words": 1},
}


_TOKENIZER_CHOICES = {"model_type": ("unigram", "bpe", "char"), "word_segmenter": ("whitespace", "jieba", "auto")}
# Fields with a fixed set of values, checked when the section is read (before any work), so a
# typo fails at once even where the value would only be used later (e.g. on a fresh tokenizer).
CHOICES: dict[type, dict[str, tuple[str, ...]]] = {
    TextDataConfig: {"format": ("auto", "lines", "paragraphs", "wikiextractor", "csv", "tsv")},
    ClassifyDataConfig: {"format": ("auto", "csv", "tsv"), "text_mode": ("join", "pair"),
                         "label_format": ("auto", "index", "name")},
    TranslationDataConfig: {"format": ("auto", "csv", "tsv")},
    TokenizerConfig: _TOKENIZER_CHOICES,
    TranslationTokenizerConfig: _TOKENIZER_CHOICES,
    OptConfig: {"schedule": ("constant", "linear", "cosine", "rsqrt")},
    TrainConfig: {"cpu_scheduler": ("memory", "concurrency")},
    MaskedLmConfig: {"objective": ("mlm", "electra"), "embedding_init": ("random", "ppmi")},
    BaselineConfig: {"features": ("auto", "word", "char"), "model": ("svm", "logreg")},
    EvalConfig: {"best_mode": ("auto", "max", "min")}, FinetuneConfig: {"wide_loss": ("joint", "separate")},
    TopicsConfig: {"covariance": ("full", "diag", "spherical"), "pooling": ("cls", "mean"),
                   "normalize": ("none", "l2", "whiten"), "prior": ("normal", "mixture")},
}


def check_minimums(cls: type, value: Any, name: str) -> None:
    """A one-line error naming the first field of `value` below its minimum or not a choice."""
    for field, minimum in MINIMUMS.get(cls, {}).items():
        given = getattr(value, field)
        if given is not None and not given >= minimum:  # `not >=` also catches NaN
            raise errors.ConfigError(f"{name}.{field}={given!r} must be >= {minimum}")
    for field, choices in CHOICES.get(cls, {}).items():
        if getattr(value, field) not in choices:
            raise errors.ConfigError(f"{name}.{field}={getattr(value, field)!r}; valid: {list(choices)}")


def word_segmenter(config) -> str:
    """`tokenizer.word_segmenter` of any task's config (its default from TokenizerConfig)."""
    return to_dict(config.get("tokenizer")).get("word_segmenter") or TokenizerConfig.word_segmenter


def section(cls: type[T], value: Any, name: str) -> T:
    """`value` (ConfigDict, mapping, None or a `cls`) read into `cls`; checks names and types.

    Args:
      cls: a frozen dataclass of this module.
      value: the config section; None reads as all defaults.
      name: the section's dotted name in the config, for error messages.
    """
    if isinstance(value, cls):
        return value
    given = to_dict(value)
    types = field_types(cls)
    unknown = sorted(set(given) - set(types))
    if unknown:
        raise errors.ConfigKeyError(f"unknown config key {name}.{unknown[0]}; valid: {sorted(types)}")
    values = {}
    for key, raw in given.items():
        annotation = types[key]
        if dataclasses.is_dataclass(annotation):
            values[key] = section(annotation, raw, f"{name}.{key}")
        else:
            values[key] = check_type(f"{name}.{key}", raw, annotation)
    result = cls(**values)
    check_minimums(cls, result, name)
    return result
