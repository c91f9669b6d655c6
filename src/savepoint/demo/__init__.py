"""The end-to-end demo (`savepoint demo`) and the tiny models and tokenizer it shares with the tests."""
