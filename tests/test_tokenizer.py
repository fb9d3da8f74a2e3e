from flashnb.paths import shipped_model_dir
from flashnb.models.tokenizer import Tokenizer, train_bpe

SAMPLES = ["Return the number of items.", "  indented\n\tcode = {'a': 1}  # comment",
           "unicode: naïve café — 数学 ∑ 🙂", ""]


def test_shipped_tokenizer_round_trip():
    tok = Tokenizer.from_folder(shipped_model_dir(), bos_id=2)
    assert tok.vocab_size <= 8192
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids[0] == 2  # OPT's BOS </s>
        assert tok.decode(ids) == text


def test_trained_bpe_round_trip_and_special_ids(tmp_path):
    tok = train_bpe(SAMPLES * 3, vocab_size=300)
    tok.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path, bos_id=2)
    assert [again.tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    for text in SAMPLES:
        assert again.decode(again.encode(text)) == text
