package org.dijiang.demo.core

// Written by scripts/android_chat_fixtures.py (do not edit): chat_format.json as the exporter
// derives it, and the conversation as transformers' apply_chat_template renders it.

class ChatFixture(val formatJson: String, val renderedJson: String, val eos: String) {
    val format: ChatFormat get() = ChatFormat.fromJson(formatJson)
    val rendered: String get() = Json.parse(renderedJson) as String
}

object ChatFormatFixtures {
    val CONVERSATION_JSON = """[["user", "Hello there"], ["assistant", "Hi! How can I help?"], ["user", "Name three long rivers."], ["assistant", "The Nile, the Amazon and the Yangtze."], ["user", "Which one is the longest?"]]"""

    val SMOLLM2 = ChatFixture(
        """{"version": 1, "first": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n", "user_suffix": "<|im_end|>\n<|im_start|>assistant\n", "between": "<|im_end|>\n<|im_start|>user\n", "source": "chat_template"}""",
        """"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>\n<|im_start|>user\nName three long rivers.<|im_end|>\n<|im_start|>assistant\nThe Nile, the Amazon and the Yangtze.<|im_end|>\n<|im_start|>user\nWhich one is the longest?<|im_end|>\n<|im_start|>assistant\n"""",
        "<|im_end|>"
    )

    val HEADERS = ChatFixture(
        """{"version": 1, "first": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", "user_suffix": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "between": "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n", "source": "chat_template"}""",
        """"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nName three long rivers.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nThe Nile, the Amazon and the Yangtze.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhich one is the longest?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"""",
        "<|eot_id|>"
    )

    val INST = ChatFixture(
        """{"version": 1, "first": "<s>[INST] ", "user_suffix": " [/INST]", "between": "</s>[INST] ", "source": "chat_template"}""",
        """"<s>[INST] Hello there [/INST]Hi! How can I help?</s>[INST] Name three long rivers. [/INST]The Nile, the Amazon and the Yangtze.</s>[INST] Which one is the longest? [/INST]"""",
        "</s>"
    )

    val ALL = listOf("SMOLLM2" to SMOLLM2, "HEADERS" to HEADERS, "INST" to INST)
}
