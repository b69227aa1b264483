package org.dijiang.demo.core

/**
 * SmolLM2-Instruct's chat template (ChatML), cut into the pieces a stateful session feeds
 * one turn at a time. Fed in order, the pieces add up to exactly what the model's Jinja
 * template renders for the whole conversation:
 *
 *     [system block]  user block  reply <|im_end|>\n  user block  reply ...
 *
 * where the template inserts [DEFAULT_SYSTEM_PROMPT] when the conversation has no system
 * message of its own.
 */
object ChatMl {
    const val IM_START = "<|im_start|>"
    const val IM_END = "<|im_end|>"

    /** What SmolLM2-Instruct's template adds when the first message is not a system message. */
    const val DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    fun block(role: String, content: String): String = "$IM_START$role\n$content$IM_END\n"

    fun systemBlock(prompt: String): String = block("system", prompt)

    /** A user message followed by the generation prompt that opens the assistant's reply. */
    fun userTurn(message: String): String = block("user", message) + "$IM_START" + "assistant\n"

    /** Closes an assistant reply: the end marker and newline the template puts after it. */
    const val CLOSE_REPLY = "$IM_END\n"
}
