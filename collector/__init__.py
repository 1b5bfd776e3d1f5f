"""Training-box side: the collector that receives device traces and publishes adapters."""
