"""/score and /score/choices: ``protocol`` (their requests and responses), ``serving`` (plans,
the engine's scores, and their Bayesian averaging over the draws), ``router`` (the routes)."""
