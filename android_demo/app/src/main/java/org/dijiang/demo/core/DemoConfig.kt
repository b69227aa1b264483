package org.dijiang.demo.core

import java.io.File

/** The user's settings, checked before they reach the runner. */
data class DemoConfig(
    val modelPath: String,
    val tokenizerPath: String,
    val temperature: Float,
    val maxNewTokens: Int
) {
    /** manifest.json beside the model, where an export folder keeps the state shapes. */
    val manifestPath: String get() = File(File(modelPath).absoluteFile.parentFile, "manifest.json").path

    /** chat_format.json beside the model: the model's chat template in turn pieces ([ChatFormat]). */
    val chatFormatPath: String get() = File(File(modelPath).absoluteFile.parentFile, ChatFormat.FILE_NAME).path

    sealed class Parsed {
        data class Ok(val config: DemoConfig) : Parsed()
        data class Invalid(val errors: List<String>) : Parsed()
    }

    companion object {
        /** Where `adb push` puts the files (README); readable by apps, as ExecuTorch's demos use it. */
        const val DEVICE_DIR = "/data/local/tmp/dijiang"
        const val MAX_NEW_TOKENS_LIMIT = 8192

        val DEFAULT = DemoConfig("$DEVICE_DIR/model.pte", "$DEVICE_DIR/tokenizer.json", 0f, 256)

        /** Parses the settings form; the runner samples only with 0 <= temperature <= 1. */
        fun parse(modelPath: String, tokenizerPath: String, temperature: String, maxNewTokens: String): Parsed {
            val errors = ArrayList<String>()
            val model = modelPath.trim()
            val tokenizer = tokenizerPath.trim()
            if (!model.endsWith(".pte")) errors.add("model path must name a .pte file")
            if (!tokenizer.endsWith(".json")) errors.add("tokenizer path must name a tokenizer.json file")
            val t = temperature.trim().toFloatOrNull()
            if (t == null || t.isNaN() || t < 0f || t > 1f) errors.add("temperature must be a number from 0 (greedy) to 1")
            val n = maxNewTokens.trim().toIntOrNull()
            if (n == null || n < 1 || n > MAX_NEW_TOKENS_LIMIT) errors.add("max tokens must be 1 to $MAX_NEW_TOKENS_LIMIT")
            if (errors.isNotEmpty()) return Parsed.Invalid(errors)
            return Parsed.Ok(DemoConfig(model, tokenizer, t!!, n!!))
        }
    }
}
