"""OpenAI compatibility: ``protocol`` (chat, completions, chunks, model cards), ``serving``
(chat and completions on top of generation, OpenAI's chunk streams, /v1/models), ``echo`` (the
legacy echo scoring of /v1/completions), ``router`` (the routes)."""
