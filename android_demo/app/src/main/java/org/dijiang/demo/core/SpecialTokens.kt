package org.dijiang.demo.core

/**
 * The text of the special tokens in a Hugging Face `tokenizer.json` (its `added_tokens`),
 * so the app can recognise the EOS token the runner decodes into a reply and keep it off
 * the screen. The EOS ids themselves come from the `.pte`'s get_eos_ids.
 */
class SpecialTokens(private val contentById: Map<Long, String>) {
    fun content(id: Long): String? = contentById[id]

    /** The texts of [ids], skipping ids that are not added tokens. */
    fun contents(ids: Collection<Long>): Set<String> = ids.mapNotNull { contentById[it] }.toSet()

    val size: Int get() = contentById.size

    companion object {
        fun fromTokenizerJson(text: String): SpecialTokens {
            val added = Json.parse(text).field("added_tokens").asList()
                ?: throw IllegalArgumentException("tokenizer.json has no added_tokens list")
            val map = LinkedHashMap<Long, String>()
            for (entry in added) {
                val id = entry.field("id").asLong() ?: continue
                val content = entry.field("content") as? String ?: continue
                map[id] = content
            }
            return SpecialTokens(map)
        }
    }
}
