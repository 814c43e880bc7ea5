from django.apps import AppConfig


class ProxyConfig(AppConfig):
    name = "apps.proxy"
    verbose_name = "Proxy"

    def ready(self) -> None:
        from apps.core.usage import recorder_register
        from apps.observability.recording import record_engine_call
        from apps.request_logs.writer import engine_call_row, request_log_writer

        # The engine calls RAG and safety make for a tenant are recorded where requests
        # are: the request log (their kind as the endpoint) and the metrics.
        recorder_register("metrics", record_engine_call)
        recorder_register(
            "request_log",
            lambda call: request_log_writer.add(engine_call_row(call)),
            drain=request_log_writer.flush,
        )
