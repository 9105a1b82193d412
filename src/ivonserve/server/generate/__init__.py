"""/generate: ``protocol`` (its request and response), ``serving`` (generation itself: plan, fan
out, select, the consensus on the wire; the OpenAI routes use it too), ``stream`` (the answer
whole or as server-sent events, and /generate's events), ``router`` (the route)."""
