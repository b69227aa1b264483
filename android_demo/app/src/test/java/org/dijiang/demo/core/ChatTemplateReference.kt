package org.dijiang.demo.core

/**
 * SmolLM2-Instruct's Jinja chat template (chat_template.jinja), rendered over a whole
 * conversation the way transformers' apply_chat_template does: the reference the
 * session's turn-by-turn feeding must add up to.
 */
object ChatTemplateReference {
    fun render(messages: List<Pair<String, String>>, addGenerationPrompt: Boolean): String {
        val sb = StringBuilder()
        messages.forEachIndexed { i, (role, content) ->
            if (i == 0 && role != "system") {
                sb.append("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")
            }
            sb.append("<|im_start|>").append(role).append('\n').append(content).append("<|im_end|>").append('\n')
        }
        if (addGenerationPrompt) sb.append("<|im_start|>assistant\n")
        return sb.toString()
    }
}
