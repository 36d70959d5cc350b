"""The built-in offline zh->en demo `zh_en_numbers`: Chinese numerals, dates and amounts in English.

Deterministic generated pairs, short and drawn from a vocabulary of a few hundred
tokens, so a small Transformer learns them on a CPU within minutes, yet not
trivially: 三万五千 -> "thirty-five thousand" regroups by 10**4 vs 10**3, 二/两
both read "two", counted nouns take measure words and English plurals, and
verbs agree with the subject. Kinds, with their share of the pairs:
  cardinals 0..99,999 (22%)  三百四十五 -> three hundred forty-five
  dates (14%)                二零二三年五月十七日 / 2023年5月17日 -> May 17, 2023; 五月十七号 -> May 17
  money (14%)                四十五元 -> forty-five yuan; 45元 -> 45 yuan; 一美元 -> one dollar
  ordinals (10%)             第三 -> the third; 第二十一天 -> the twenty-first day
  counted nouns (8%)         三只猫 -> three cats; 两个孩子 -> two children
  sentences (16%)            他有三只猫。 -> He has three cats.
                             桌子上有一本书。 -> There is one book on the table.
  arithmetic (8%)            三加五等于八 -> three plus five equals eight
  clock times (8%)           下午三点半 -> half past three in the afternoon
Written once as english<TAB>chinese TSV (the Tatoeba layout): train 20,000 pairs
(seed 0) and validation 500 pairs with distinct sources (seed 1), none of which
occurs in train.
"""

from __future__ import annotations

import os
import random
import re

DEMO_SIZES = {"train": 20_000, "validation": 500}

_DIGITS = "零一二三四五六七八九"
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "- - twenty thirty forty fifty sixty seventy eighty ninety".split()
_IRREGULAR_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                       "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_NOUNS = (("只", "猫", "cat", "cats"), ("只", "狗", "dog", "dogs"), ("只", "鸟", "bird", "birds"),
          ("本", "书", "book", "books"), ("个", "苹果", "apple", "apples"),
          ("个", "人", "person", "people"), ("个", "孩子", "child", "children"),
          ("条", "鱼", "fish", "fish"), ("条", "河", "river", "rivers"), ("辆", "车", "car", "cars"),
          ("杯", "茶", "cup of tea", "cups of tea"), ("张", "桌子", "table", "tables"),
          ("把", "椅子", "chair", "chairs"), ("朵", "花", "flower", "flowers"),
          ("双", "鞋", "pair of shoes", "pairs of shoes"))
_ORDINAL_NOUNS = (("天", "", "day", ""), ("次", "", "time", ""), ("年", "", "year", ""))
_SUBJECTS = (("我", "I", False), ("你", "you", False), ("他", "he", True), ("她", "she", True),
             ("我们", "we", False), ("他们", "they", False))
_VERBS = (("有", "have", "has"), ("想要", "want", "wants"), ("需要", "need", "needs"),
          ("买了", "bought", "bought"), ("看见了", "saw", "saw"))
_PLACES = (("桌子上", "on the table"), ("房间里", "in the room"), ("公园里", "in the park"),
           ("家里", "at home"))
_PERIODS = (("", ""), ("上午", " in the morning"), ("下午", " in the afternoon"),
            ("晚上", " in the evening"))


def english_number(n: int) -> str:
    """0 <= n < 10**9 in words, American style: 345 -> 'three hundred forty-five'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    size, word = next(s for s in ((10 ** 6, "million"), (1000, "thousand"), (100, "hundred"))
                      if n >= s[0])
    return f"{english_number(n // size)} {word}" + (f" {english_number(n % size)}" if n % size else "")


def english_ordinal(n: int) -> str:
    """1 -> 'first', 21 -> 'twenty-first', 40 -> 'fortieth'."""
    head, last = re.fullmatch(r"(.*?)([a-z]+)", english_number(n)).groups()
    suffix = last[:-1] + "ieth" if last.endswith("y") else last + "th"
    return head + _IRREGULAR_ORDINALS.get(last, suffix)


def _chinese_section(n: int, leading: bool, two: str) -> str:
    """0 < n < 10000 in Chinese; `leading`: the number's first section (十五, not 一十五)."""
    out, gap = [], False
    for unit, d in zip(("千", "百", "十", ""), (n // 1000, n // 100 % 10, n // 10 % 10, n % 10)):
        if d == 0:
            gap = gap or bool(out)
            continue
        digit = _DIGITS[d]
        if leading and not out and d == 1 and unit == "十":
            digit = ""
        elif leading and not out and d == 2 and unit in ("千", "百"):
            digit = two
        out.append(("零" if gap else "") + digit + unit)
        gap = False
    return "".join(out)


def chinese_number(n: int, two: str = "二") -> str:
    """0 <= n < 10**8 in Chinese numerals: 345 -> 三百四十五, 10010 -> 一万零一十; `two`: 二 or 两
    for a leading 2 before 百/千/万."""
    high, low = divmod(n, 10_000)
    if not high:
        return _chinese_section(low, True, two) if low else "零"
    text = (two if high == 2 else _chinese_section(high, True, two)) + "万"
    return text + ("零" if 0 < low < 1000 else "") + (_chinese_section(low, False, two) if low else "")


def _count(n: int, rng: random.Random) -> str:
    """A quantity before a measure word or unit: 两 for 2 (两只猫)."""
    return "两" if n == 2 else chinese_number(n, rng.choice("二两"))


def _cardinal(rng):
    n = rng.randint(0, 10 ** rng.randint(1, 5) - 1)
    if rng.random() < 0.3:  # round numbers: 35000, 1200
        n -= n % 10 ** max(0, len(str(n)) - 2)
    return chinese_number(n, rng.choice("二两")), english_number(n)


def _date(rng):
    year, month = rng.randint(1980, 2030), rng.randint(1, 12)
    day = rng.randint(1, _MONTH_DAYS[month - 1])
    english, style = f"{_MONTHS[month - 1]} {day}", rng.randrange(4)
    if style == 0:
        year_zh = "".join(_DIGITS[int(c)] for c in str(year))
        return f"{year_zh}年{chinese_number(month)}月{chinese_number(day)}日", f"{english}, {year}"
    if style == 1:
        return f"{year}年{month}月{day}日", f"{english}, {year}"
    if style == 2:
        return f"{chinese_number(month)}月{chinese_number(day)}{rng.choice('日号')}", english
    return f"{month}月{day}日", english


def _money(rng):
    n = rng.randint(1, 10 ** rng.randint(1, 4) - 1)
    zh, en = (_count(n, rng), english_number(n)) if rng.random() < 0.5 else (str(n), str(n))
    if rng.random() < 0.4:
        return f"{zh}美元", f"{en} dollar{'' if n == 1 else 's'}"
    return zh + rng.choice(("元", "元", "块")), f"{en} yuan"


def _ordinal(rng):
    n = rng.choice((rng.randint(1, 10), rng.randint(1, 99)))
    kind = rng.randrange(3)
    if kind == 0:
        return f"第{chinese_number(n)}", f"the {english_ordinal(n)}"
    measure, noun, singular, _ = rng.choice(_ORDINAL_NOUNS if kind == 1 else _NOUNS)
    return f"第{chinese_number(n)}{measure}{noun}", f"the {english_ordinal(n)} {singular}"


def _counted(rng):
    n = rng.choice((1, 2, rng.randint(1, 12), rng.randint(1, 99)))
    measure, noun, singular, plural = rng.choice(_NOUNS)
    return f"{_count(n, rng)}{measure}{noun}", f"{english_number(n)} {singular if n == 1 else plural}"


def _sentence(rng):
    zh, en = _counted(rng)
    if rng.random() < 0.3:
        place_zh, place_en = rng.choice(_PLACES)
        verb = "is" if en.startswith("one ") else "are"
        return f"{place_zh}有{zh}。", f"There {verb} {en} {place_en}."
    subject_zh, subject_en, third = rng.choice(_SUBJECTS)
    verb_zh, verb, verb_third = rng.choice(_VERBS)
    english = f"{subject_en} {verb_third if third else verb} {en}."
    return f"{subject_zh}{verb_zh}{zh}。", english[0].upper() + english[1:]


def _arithmetic(rng):
    a, b, op = rng.randint(0, 20), rng.randint(0, 20), rng.randrange(3)
    a, b = (max(a, b), min(a, b)) if op == 1 else (a, b)  # no negative results
    zh_op, en_op, value = (("加", "plus", a + b), ("减", "minus", a - b), ("乘以", "times", a * b))[op]
    return (f"{chinese_number(a)}{zh_op}{chinese_number(b)}等于{chinese_number(value)}",
            f"{english_number(a)} {en_op} {english_number(b)} equals {english_number(value)}")


def _clock(rng):
    hour, minute = rng.randint(1, 12), rng.choice((0, 30, 15, 45, rng.randint(10, 59)))
    period_zh, period_en = rng.choice(_PERIODS)
    if minute == 0:
        zh, en = f"{_count(hour, rng)}点", f"{english_number(hour)} o'clock"
    elif minute == 30:
        zh, en = f"{_count(hour, rng)}点半", f"half past {english_number(hour)}"
    else:
        zh = f"{_count(hour, rng)}点{chinese_number(minute)}分"
        en = f"{english_number(hour)} {english_number(minute)}"
    return period_zh + zh, en + period_en


_KINDS = ((_cardinal, 22), (_date, 14), (_money, 14), (_ordinal, 10), (_counted, 8),
          (_sentence, 16), (_arithmetic, 8), (_clock, 8))


def demo_pairs(count: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """`count` (chinese, english) pairs of numerals, dates, money, ordinals, counted nouns and
    short sentences; deterministic in `seed`; sources in `exclude` are skipped."""
    rng = random.Random(seed)
    kinds, weights = zip(*_KINDS)
    pairs = []
    while len(pairs) < count:
        pair = rng.choices(kinds, weights)[0](rng)
        if pair[0] not in exclude:
            pairs.append(pair)
    return pairs


def write_files(cache_dir: str) -> dict[str, str]:
    """Writes the demo once as english<TAB>chinese TSV (the Tatoeba layout); {split: path}.

    Validation (seed 1) holds distinct sources; training (seed 0) skips them, so no
    validation pair appears in training.
    """
    out_dir = os.path.join(cache_dir, "zh_en_numbers_v1")
    paths = {split: os.path.join(out_dir, f"{split}.tsv") for split in DEMO_SIZES}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    validation = list(dict(demo_pairs(4 * DEMO_SIZES["validation"], seed=1)).items())
    validation = validation[:DEMO_SIZES["validation"]]
    train = demo_pairs(DEMO_SIZES["train"], seed=0, exclude=frozenset(zh for zh, _ in validation))
    for split, pairs in (("train", train), ("validation", validation)):
        tmp = paths[split] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{en}\t{zh}\n" for zh, en in pairs)
        os.replace(tmp, paths[split])
    return paths
