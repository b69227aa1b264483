package org.dijiang.demo.core

/**
 * The statistics ExecuTorch's LLM runner reports after each generate(): the JSON that
 * LlmCallback.onStats receives on Android, and that the C++ runner prints on stdout as
 * `PyTorchObserver {...}`. Times are wall-clock milliseconds.
 *
 * Token counts follow the runner: [promptTokens] were prefilled in this call, and
 * [generatedTokens] were fed back through the model while decoding. The last sampled token
 * (EOS, or the one that hit a limit) is reported to the app but never fed, so the state
 * advanced by exactly `promptTokens + generatedTokens` positions.
 */
data class RunnerStats(
    val promptTokens: Long,
    val generatedTokens: Long,
    val inferenceStartMs: Long,
    val promptEvalEndMs: Long,
    val inferenceEndMs: Long,
    val firstTokenMs: Long,
    val modelLoadStartMs: Long = 0,
    val modelLoadEndMs: Long = 0
) {
    /** Positions this call added to the recurrent state. */
    val positionsFed: Long get() = promptTokens + generatedTokens

    /** Decode speed as the runner defines it: fed decode tokens over the time after prefill. */
    val decodeTokensPerSecond: Double?
        get() = rate(generatedTokens, inferenceEndMs - promptEvalEndMs)

    val prefillTokensPerSecond: Double?
        get() = rate(promptTokens, promptEvalEndMs - inferenceStartMs)

    val timeToFirstTokenMs: Long get() = firstTokenMs - inferenceStartMs

    companion object {
        private const val OBSERVER_PREFIX = "PyTorchObserver "

        /**
         * Parses the stats JSON, or a runner output line `PyTorchObserver {...}`.
         * Returns null when the text is not stats JSON (a plain log line, say).
         */
        fun parse(text: String): RunnerStats? {
            val trimmed = text.trim()
            val start = trimmed.indexOf(OBSERVER_PREFIX)
            val json = if (start >= 0) trimmed.substring(start + OBSERVER_PREFIX.length) else trimmed
            if (!json.startsWith("{")) return null
            val root = try {
                Json.parse(json)
            } catch (e: IllegalArgumentException) {
                return null
            }
            fun long(key: String): Long? = root.field(key).asLong()
            return RunnerStats(
                promptTokens = long("prompt_tokens") ?: return null,
                generatedTokens = long("generated_tokens") ?: return null,
                inferenceStartMs = long("inference_start_ms") ?: return null,
                promptEvalEndMs = long("prompt_eval_end_ms") ?: return null,
                inferenceEndMs = long("inference_end_ms") ?: return null,
                firstTokenMs = long("first_token_ms") ?: 0,
                modelLoadStartMs = long("model_load_start_ms") ?: 0,
                modelLoadEndMs = long("model_load_end_ms") ?: 0
            )
        }

        /** The last stats line in a runner's captured stdout, or null. */
        fun lastInOutput(output: String): RunnerStats? =
            output.lines().reversed().asSequence().mapNotNull { line ->
                if (line.contains(OBSERVER_PREFIX)) parse(line) else null
            }.firstOrNull()

        private fun rate(tokens: Long, ms: Long): Double? =
            if (ms > 0 && tokens >= 0) tokens * 1000.0 / ms else null
    }
}
