from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TranslateRequest(_message.Message):
    __slots__ = ("texts", "options", "request_id", "terms", "document", "model", "source_language", "target_language")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    options: DecodingOptions
    request_id: str
    terms: _containers.RepeatedCompositeFieldContainer[Term]
    document: DocumentOptions
    model: str
    source_language: str
    target_language: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., terms: _Optional[_Iterable[_Union[Term, _Mapping]]] = ..., document: _Optional[_Union[DocumentOptions, _Mapping]] = ..., model: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ...) -> None: ...

class Term(_message.Message):
    __slots__ = ("source", "target")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class DocumentOptions(_message.Message):
    __slots__ = ("enabled", "markup", "language")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MARKUP_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    markup: bool
    language: str
    def __init__(self, enabled: _Optional[bool] = ..., markup: _Optional[bool] = ..., language: _Optional[str] = ...) -> None: ...

class DecodingOptions(_message.Message):
    __slots__ = ("beam_size", "length_penalty", "max_length", "n_best", "min_length", "return_scores", "return_alignments", "max_len_a", "max_len_b", "length_penalty_form", "length_includes_eos", "no_repeat_ngram", "sample", "top_k", "top_p", "temperature", "seed", "target_prefix")
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    N_BEST_FIELD_NUMBER: _ClassVar[int]
    MIN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RETURN_SCORES_FIELD_NUMBER: _ClassVar[int]
    RETURN_ALIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_A_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_B_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FORM_FIELD_NUMBER: _ClassVar[int]
    LENGTH_INCLUDES_EOS_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TARGET_PREFIX_FIELD_NUMBER: _ClassVar[int]
    beam_size: int
    length_penalty: float
    max_length: int
    n_best: int
    min_length: int
    return_scores: bool
    return_alignments: bool
    max_len_a: float
    max_len_b: int
    length_penalty_form: str
    length_includes_eos: bool
    no_repeat_ngram: int
    sample: bool
    top_k: int
    top_p: float
    temperature: float
    seed: int
    target_prefix: str
    def __init__(self, beam_size: _Optional[int] = ..., length_penalty: _Optional[float] = ..., max_length: _Optional[int] = ..., n_best: _Optional[int] = ..., min_length: _Optional[int] = ..., return_scores: _Optional[bool] = ..., return_alignments: _Optional[bool] = ..., max_len_a: _Optional[float] = ..., max_len_b: _Optional[int] = ..., length_penalty_form: _Optional[str] = ..., length_includes_eos: _Optional[bool] = ..., no_repeat_ngram: _Optional[int] = ..., sample: _Optional[bool] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., target_prefix: _Optional[str] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("translations", "model")
    TRANSLATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    translations: _containers.RepeatedCompositeFieldContainer[Translation]
    model: ModelIdentity
    def __init__(self, translations: _Optional[_Iterable[_Union[Translation, _Mapping]]] = ..., model: _Optional[_Union[ModelIdentity, _Mapping]] = ...) -> None: ...

class Translation(_message.Message):
    __slots__ = ("hypotheses", "document")
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    document: TranslatedDocument
    def __init__(self, hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., document: _Optional[_Union[TranslatedDocument, _Mapping]] = ...) -> None: ...

class TranslatedDocument(_message.Message):
    __slots__ = ("text", "sentences")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    text: str
    sentences: _containers.RepeatedCompositeFieldContainer[DocumentSentence]
    def __init__(self, text: _Optional[str] = ..., sentences: _Optional[_Iterable[_Union[DocumentSentence, _Mapping]]] = ...) -> None: ...

class DocumentSentence(_message.Message):
    __slots__ = ("source_start", "source_end", "target_start", "target_end", "text")
    SOURCE_START_FIELD_NUMBER: _ClassVar[int]
    SOURCE_END_FIELD_NUMBER: _ClassVar[int]
    TARGET_START_FIELD_NUMBER: _ClassVar[int]
    TARGET_END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    source_start: int
    source_end: int
    target_start: int
    target_end: int
    text: str
    def __init__(self, source_start: _Optional[int] = ..., source_end: _Optional[int] = ..., target_start: _Optional[int] = ..., target_end: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("text", "score", "alignment", "unmet_terms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    UNMET_TERMS_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    alignment: Alignment
    unmet_terms: _containers.RepeatedCompositeFieldContainer[Term]
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ..., alignment: _Optional[_Union[Alignment, _Mapping]] = ..., unmet_terms: _Optional[_Iterable[_Union[Term, _Mapping]]] = ...) -> None: ...

class Alignment(_message.Message):
    __slots__ = ("source_tokens", "target_tokens", "weights")
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    source_tokens: _containers.RepeatedScalarFieldContainer[str]
    target_tokens: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, source_tokens: _Optional[_Iterable[str]] = ..., target_tokens: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class TranslateStreamResponse(_message.Message):
    __slots__ = ("index", "text", "done", "translation", "model", "sentence")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    done: bool
    translation: Translation
    model: ModelIdentity
    sentence: DocumentSentence
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ..., translation: _Optional[_Union[Translation, _Mapping]] = ..., model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., sentence: _Optional[_Union[DocumentSentence, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "checkpoint", "source_language", "target_language")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint: str
    source_language: str
    target_language: str
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("name", "checkpoint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint: str
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelIdentity(_message.Message):
    __slots__ = ("name", "checkpoint_sha256", "source_language", "target_language")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint_sha256: str
    source_language: str
    target_language: str
    def __init__(self, name: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "vocabulary_size", "preset", "tokenizer_sha256", "architecture", "limits", "defaults", "metrics", "provenance")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    model: ModelIdentity
    vocabulary_size: int
    preset: str
    tokenizer_sha256: str
    architecture: Architecture
    limits: Limits
    defaults: DecodingOptions
    metrics: _containers.ScalarMap[str, float]
    provenance: Provenance
    def __init__(self, model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., vocabulary_size: _Optional[int] = ..., preset: _Optional[str] = ..., tokenizer_sha256: _Optional[str] = ..., architecture: _Optional[_Union[Architecture, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., defaults: _Optional[_Union[DecodingOptions, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("weights_sha256", "verified", "step", "created", "training_config_json", "code_commit", "code_dirty", "versions", "corpus", "corpus_sha256", "valid_bleu", "test_scores", "averaged_from")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TRAINING_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CODE_COMMIT_FIELD_NUMBER: _ClassVar[int]
    CODE_DIRTY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    CORPUS_SHA256_FIELD_NUMBER: _ClassVar[int]
    VALID_BLEU_FIELD_NUMBER: _ClassVar[int]
    TEST_SCORES_FIELD_NUMBER: _ClassVar[int]
    AVERAGED_FROM_FIELD_NUMBER: _ClassVar[int]
    weights_sha256: str
    verified: bool
    step: int
    created: str
    training_config_json: str
    code_commit: str
    code_dirty: bool
    versions: _containers.ScalarMap[str, str]
    corpus: str
    corpus_sha256: str
    valid_bleu: float
    test_scores: _containers.RepeatedCompositeFieldContainer[TestScore]
    averaged_from: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, weights_sha256: _Optional[str] = ..., verified: _Optional[bool] = ..., step: _Optional[int] = ..., created: _Optional[str] = ..., training_config_json: _Optional[str] = ..., code_commit: _Optional[str] = ..., code_dirty: _Optional[bool] = ..., versions: _Optional[_Mapping[str, str]] = ..., corpus: _Optional[str] = ..., corpus_sha256: _Optional[str] = ..., valid_bleu: _Optional[float] = ..., test_scores: _Optional[_Iterable[_Union[TestScore, _Mapping]]] = ..., averaged_from: _Optional[_Iterable[str]] = ...) -> None: ...

class TestScore(_message.Message):
    __slots__ = ("test", "bleu", "chrf", "beam_size", "bleu_signature", "date")
    TEST_FIELD_NUMBER: _ClassVar[int]
    BLEU_FIELD_NUMBER: _ClassVar[int]
    CHRF_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLEU_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    test: str
    bleu: float
    chrf: float
    beam_size: int
    bleu_signature: str
    date: str
    def __init__(self, test: _Optional[str] = ..., bleu: _Optional[float] = ..., chrf: _Optional[float] = ..., beam_size: _Optional[int] = ..., bleu_signature: _Optional[str] = ..., date: _Optional[str] = ...) -> None: ...

class Architecture(_message.Message):
    __slots__ = ("d_model", "n_heads", "n_layers", "d_ff", "max_positions")
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_FF_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    max_positions: int
    def __init__(self, d_model: _Optional[int] = ..., n_heads: _Optional[int] = ..., n_layers: _Optional[int] = ..., d_ff: _Optional[int] = ..., max_positions: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sentences", "max_sentence_chars", "max_source_tokens", "max_beam_size", "max_length", "max_message_bytes", "max_request_cost", "max_document_chars", "max_document_sentences", "max_terms", "max_term_chars")
    MAX_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_SENTENCE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_COST_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENT_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_TERMS_FIELD_NUMBER: _ClassVar[int]
    MAX_TERM_CHARS_FIELD_NUMBER: _ClassVar[int]
    max_sentences: int
    max_sentence_chars: int
    max_source_tokens: int
    max_beam_size: int
    max_length: int
    max_message_bytes: int
    max_request_cost: int
    max_document_chars: int
    max_document_sentences: int
    max_terms: int
    max_term_chars: int
    def __init__(self, max_sentences: _Optional[int] = ..., max_sentence_chars: _Optional[int] = ..., max_source_tokens: _Optional[int] = ..., max_beam_size: _Optional[int] = ..., max_length: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_request_cost: _Optional[int] = ..., max_document_chars: _Optional[int] = ..., max_document_sentences: _Optional[int] = ..., max_terms: _Optional[int] = ..., max_term_chars: _Optional[int] = ...) -> None: ...
