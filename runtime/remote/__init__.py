"""Remote OpenAI-compatible providers: settings, client, failures worth a retry, streaming, breaker and budget, tasks asked remotely."""
