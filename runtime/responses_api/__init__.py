"""OpenAI's Responses API as a translation of chat completions: a request becomes a
``ChatCompletionRequest`` routed, matched, traced and escalated like any chat call, and its answer
(a body or a chunk stream) becomes a response object or the Responses stream events."""
