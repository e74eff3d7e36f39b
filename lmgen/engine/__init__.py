"""The engine: requests, scheduler, model runner and the step loop."""
