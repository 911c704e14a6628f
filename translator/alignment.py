"""Which elements each target token sits in, read from the cross-attention alignments.

As Bergamot's HTML translation (bergamot-translator's html.cpp) does it: a hard alignment per
target token (the source token with the most attention, end-of-sentence left out), shared by all
tokens of a target word; a token whose alignment is not confident keeps only the elements it shares
with the confident tokens around it.
"""

from __future__ import annotations

from translator.markup import Stack, common_depth


def word_ids(target_pieces: list[str]) -> list[int]:
    """Per target token, the index of its word (see starts_word)."""
    ids, word = [], -1
    for t, piece in enumerate(target_pieces):
        word += t == 0 or starts_word(target_pieces[t - 1], piece)
        ids.append(word)
    return ids


# A source token's head word is the target word it attends to most, or a rarer word after that one
# it attends to at least this share as much, unless the first attends to it at least
# PART_ATTENTION (chosen on Multi30K val, both directions, docs/RESULTS.md).
LATER_HEAD_SHARE = 0.5
PART_ATTENTION = 0.6


def confident(
    words: list[int], alignment: list[list[float]], links: list[int | None], eligible: list[bool],
    rarity: list[float] = (),
) -> list[bool]:
    """Per target token, whether its word is its source token's head word, among the `eligible`
    tokens: the target word the source token attends to most, so that the alignment holds both
    ways (an article attends to its noun, but the noun's source word attends most to the noun: the
    article is not confident). Given each word's `rarity` (the log-probability of its rarest
    piece), a rarer word after that one that the source token attends to at least
    LATER_HEAD_SHARE as much is the head instead: as the decoder gets ready to write a word's
    translation, it attends to the word already for the common words that come first, the
    auxiliary, pronoun or preposition ("hat sich ... versammelt" for "gathered", "auf
    Instrumenten" for "instruments"), though less than PART_ATTENTION: a word that attends to it
    that much is part of its translation and stays its head (the first of two words for one,
    "fishing poles" for "Angelruten")."""
    attention: dict[int, dict[int, float]] = {}  # source token -> target word -> attention at its most
    for t, src in enumerate(links):
        if src is not None and eligible[t]:
            row = attention.setdefault(src, {})
            row[words[t]] = max(row.get(words[t], 0.0), alignment[t][src])
    head: dict[int, int] = {}
    for src, row in attention.items():
        top = max(row, key=row.get)
        later = [w for w, a in row.items() if w >= top and a >= LATER_HEAD_SHARE * row[top]]
        head[src] = min(later, key=lambda w: rarity[w]) if rarity and row[top] < PART_ATTENTION else top
    return [src is not None and eligible[t] and head[src] == words[t] for t, src in enumerate(links)]


# A word next to a sure word of the same source token is a further part of its translation when it
# attends to that token at least this much, and this many times more than to any source token
# outside the token's elements (chosen on 50 lines of Multi30K val, docs/RESULTS.md).
FURTHER_PART_ATTENTION = 0.4
FURTHER_PART_MARGIN = 2.0
# A word at least this likely under the tokenizer's unigram model (log-probability of its rarest
# piece) is a common one: an article, a preposition, an auxiliary ("the" -4.4, "are" -5.4).
COMMON_WORD = -6.0


def further_parts(
    words: list[int], sure: list[bool], links: list[int | None], alignment: list[list[float]], source_stacks: list[Stack],
    lettered: list[bool], rarity: list[float] = (),
) -> list[bool]:
    """`sure` with the further words of one source word's translation added ("Bauarbeiter":
    "construction workers", "Baseballschläger": "baseball bat"): a word of letters or digits right
    after a sure word aligned to the same source token that attends to that token strongly
    (FURTHER_PART_ATTENTION) and clearly more than to any token of another stack
    (FURTHER_PART_MARGIN), so that a preposition that half attends to the noun before it ("a
    snowmobile in") stays outside. To the left, the words before a translation's head that attend
    to it are mostly its articles, prepositions and auxiliaries: a word there joins only when it
    attends as strongly as a part of the translation does (PART_ATTENTION), is not common (by its
    `rarity`, when known) and the source token is in an element ("<b>stone floor</b>" for
    "Steinboden", where the head is "floor")."""
    held = list(sure)
    grown = True
    while grown:
        grown = False
        for t, s in enumerate(links):
            if held[t] or s is None or not lettered[t]:
                continue
            after = any(held[i] and links[i] == s and words[t] - words[i] == 1 for i in range(len(links)))
            before = (bool(rarity) and rarity[words[t]] < COMMON_WORD and bool(source_stacks[s])
                      and any(held[i] and links[i] == s and words[i] - words[t] == 1 for i in range(len(links))))
            if not (after or before):
                continue  # no sure word of the same source token beside it
            part = [i for i in range(len(links)) if words[i] == words[t]]
            own = max(alignment[i][s] for i in part)
            rival = max((alignment[i][j] for i in part for j in range(len(source_stacks))
                         if source_stacks[j] != source_stacks[s]), default=0.0)
            strong = own >= FURTHER_PART_ATTENTION if after else own >= PART_ATTENTION
            if strong and own >= FURTHER_PART_MARGIN * rival:
                for i in part:
                    held[i] = True
                grown = True
    return held


def target_stacks(
    source_stacks: list[Stack], links: list[int | None], target_pieces: list[str], alignment: list[list[float]],
    source_punctuation: list[bool], log_probs: list[float] = (),
) -> list[Stack | None]:
    """Per target token, its aligned source token's stack when the alignment is confident; else
    only the elements it shares with the confident tokens on both sides (the piece's outer
    elements at its ends), so that an element does not spread onto an article or a repetition.
    A word of punctuation alone holds only the element of source punctuation
    (`source_punctuation`, per source token): a comma the translation adds where the source has
    none attends to the word that called for it, but a person leaves it outside that word's
    element. An element that no token holds then goes onto the target word (of letters or
    digits, where there is one) that attends most to it through any of its pieces; a verbatim
    one, which would replace that word, is left to `_target_units`. `log_probs`: per target
    token, its piece's log-probability (see `confident`), when known."""
    words = word_ids(target_pieces)
    texts: dict[int, str] = {}
    for w, piece in zip(words, target_pieces):
        texts[w] = texts.get(w, "") + piece
    lettered = [any(ch.isalnum() for ch in texts[w]) for w in words]  # per token: its word has letters or digits
    eligible = [has or (s is not None and source_punctuation[s]) for has, s in zip(lettered, links)]
    rarity = word_rarity(words, log_probs)
    sure = further_parts(words, confident(words, alignment, links, eligible, rarity), links, alignment, source_stacks,
                         lettered, rarity)
    own = [source_stacks[s] if s is not None else None for s in links]
    outer = prefix(source_stacks) if source_stacks else ()
    out: list[Stack | None] = []
    for t, stack in enumerate(own):
        if stack is None or sure[t]:
            out.append(stack)
            continue
        before = next((own[i] for i in range(t - 1, -1, -1) if sure[i]), outer)
        after = next((own[i] for i in range(t + 1, len(own)) if sure[i]), outer)
        out.append(prefix([stack, before or (), after or ()]))
    kept = {id(e) for stack in out if stack for e in stack}
    for element in {id(e): e for stack in source_stacks for e in stack}.values():
        if id(element) in kept or not out or element.verbatim:  # a verbatim one replaces no word
            continue
        holders = [s for s, stack in enumerate(source_stacks) if any(e is element for e in stack)]
        wordy = [t for t, has in enumerate(lettered) if has]  # every piece of a word, its bare "▁" too
        pairs = [(t, s) for t in (wordy or range(len(out))) for s in holders]
        t, s = max(pairs, key=lambda ts: alignment[ts[0]][ts[1]])
        for i in (i for i in range(len(out)) if words[i] == words[t]):
            out[i] = source_stacks[s]
        kept |= {id(e) for e in source_stacks[s]}
    return out


def word_rarity(words: list[int], log_probs: list[float]) -> list[float]:
    """Per target word (of `word_ids`), the log-probability of its rarest piece; empty without a
    log-probability per token."""
    if not words or len(log_probs) != len(words):
        return []
    rarity = [0.0] * (words[-1] + 1)
    for w, lp in zip(words, log_probs):
        rarity[w] = min(rarity[w], lp)
    return rarity


def prefix(stacks: list[Stack]) -> Stack:
    """The elements all `stacks` share, outermost first."""
    n = min(len(s) for s in stacks)
    for other in stacks[1:]:
        n = min(n, common_depth(stacks[0], other))
    return stacks[0][:n]


def hard_alignment(target_pieces: list[str], alignment: list[list[float]], source: list[str]) -> list[int | None]:
    """Per target token, the source token (of the texts `source`) it is aligned to: the likeliest
    one over all the tokens of its word, so a word keeps its markup whole. A word of punctuation
    alone goes with the likeliest punctuation of the source when there is some: attention puts a
    full stop on the word before it, which would pull the stop into that word's element.
    None when there are no source tokens."""
    n = len(source)
    if n == 0:
        return [None] * len(target_pieces)
    marks = [i for i, text in enumerate(source) if is_punctuation(text)]
    links: list[int | None] = [None] * len(target_pieces)
    word_start = 0
    for t in range(1, len(target_pieces) + 1):
        if t < len(target_pieces) and not starts_word(target_pieces[t - 1], target_pieces[t]):
            continue
        word = range(word_start, t)
        punctuation = marks and is_punctuation("".join(target_pieces[i] for i in word))
        candidates = marks if punctuation else range(n)
        _, best = max(((i, s) for i in word for s in candidates), key=lambda pair: alignment[pair[0]][pair[1]])
        for i in word:
            links[i] = best
        word_start = t
    return links


def is_punctuation(text: str) -> bool:
    text = text.replace("\u2581", "").strip()
    return bool(text) and not any(ch.isalnum() for ch in text)


def starts_word(previous: str, piece: str) -> bool:
    """Whether a piece begins a word: after a space ('\u2581'), or where a letter or digit meets
    anything else, so that punctuation is a word of its own (as Bergamot's delimiters do); but a
    hyphen joins what it touches without a space, so that a compound stays one word
    ("gelb-blaue", "short-haired", "Verkehrs-")."""
    if previous == "\u2581":  # a space piece alone begins the word of the piece after it
        return False
    if piece.startswith("\u2581") or not previous or not piece:
        return True
    if piece[0] == "-" and previous[-1].isalnum():
        return False
    if previous[-1] == "-" and piece[0].isalnum() and not previous.startswith("\u2581"):
        return False
    return not (previous[-1].isalnum() and piece[0].isalnum())
