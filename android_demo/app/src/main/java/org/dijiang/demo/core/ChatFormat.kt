package org.dijiang.demo.core

/**
 * The model's chat template cut into the pieces a stateful session feeds one turn at a
 * time, read from the export folder's `chat_format.json` (the exporter derives it from the
 * tokenizer's own chat template, or picks one by model family when there is none; its
 * [source] says which). Fed in order,
 *
 *     first + user 1 + userSuffix + reply 1 + between + user 2 + userSuffix + reply 2 ...
 *
 * is exactly what the template renders for the whole conversation. [between] starts with
 * the text of the EOS token that ended the reply: the runner never feeds that token back.
 */
data class ChatFormat(
    val first: String,
    val userSuffix: String,
    val between: String,
    val source: String
) {
    /** The text the first turn feeds, at position 0. */
    fun firstTurn(message: String): String = first + message + userSuffix

    /** A later turn's text, after a reply that ended at its EOS. */
    fun nextTurn(message: String): String = between + message + userSuffix

    companion object {
        const val FILE_NAME = "chat_format.json"
        const val VERSION = 1L

        fun fromJson(text: String): ChatFormat {
            val root = Json.parse(text) as? Map<*, *>
                ?: throw IllegalArgumentException("$FILE_NAME is not a JSON object")
            val version = root.field("version").asLong()
            require(version == VERSION) {
                "$FILE_NAME has version $version, this app reads version $VERSION: export the model again"
            }
            fun piece(name: String): String = root.field(name) as? String
                ?: throw IllegalArgumentException("$FILE_NAME lacks the text \"$name\": export the model again")
            val between = piece("between")
            require(between.isNotEmpty()) { "$FILE_NAME has an empty \"between\": export the model again" }
            return ChatFormat(piece("first"), piece("user_suffix"), between, root.field("source") as? String ?: "")
        }
    }
}
