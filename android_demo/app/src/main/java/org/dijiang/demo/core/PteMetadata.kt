package org.dijiang.demo.core

/**
 * The constant methods of a dijiang-edge `.pte` (DESIGN.md section 3) that the app and the
 * ExecuTorch LLM runner read. Defaults are the runner's own when a method is absent, so the
 * app sees the model the way the runner will drive it.
 */
data class PteMetadata(
    val maxSeqLen: Long,
    val maxContextLen: Long,
    val bosId: Long?,
    val eosIds: List<Long>,
    val vocabSize: Long?,
    val nLayers: Long?,
    val useKvCache: Boolean,
    val enableDynamicShape: Boolean
) {
    /**
     * Why the runner cannot keep this model's state across turns, or null when it can.
     * With use_kv_cache false the runner re-feeds the whole sequence at every step, which a
     * recurrent state would count twice.
     */
    fun problem(): String? = when {
        !useKvCache -> "use_kv_cache is false: the runner would re-feed every token into the recurrent state"
        eosIds.isEmpty() -> "get_eos_ids is empty: replies would never stop on their own"
        maxSeqLen <= 0 -> "get_max_seq_len is $maxSeqLen"
        else -> null
    }

    companion object {
        const val MAX_SEQ_LEN = "get_max_seq_len"
        const val MAX_CONTEXT_LEN = "get_max_context_len"
        const val BOS_ID = "get_bos_id"
        const val EOS_IDS = "get_eos_ids"
        const val VOCAB_SIZE = "get_vocab_size"
        const val N_LAYERS = "get_n_layers"
        const val USE_KV_CACHE = "use_kv_cache"
        const val ENABLE_DYNAMIC_SHAPE = "enable_dynamic_shape"

        /**
         * Reads the metadata through [constant], which runs a constant method of the program
         * and returns its values (booleans as 0/1), or null when the program has no such method.
         */
        fun read(constant: (String) -> List<Long>?): PteMetadata {
            fun single(name: String): Long? = constant(name)?.firstOrNull()
            val maxSeqLen = single(MAX_SEQ_LEN)
                ?: throw IllegalArgumentException("not an LLM .pte: it has no $MAX_SEQ_LEN method")
            return PteMetadata(
                maxSeqLen = maxSeqLen,
                maxContextLen = single(MAX_CONTEXT_LEN) ?: maxSeqLen,
                bosId = single(BOS_ID),
                eosIds = constant(EOS_IDS) ?: emptyList(),
                vocabSize = single(VOCAB_SIZE),
                nLayers = single(N_LAYERS),
                useKvCache = (single(USE_KV_CACHE) ?: 1L) != 0L,
                enableDynamicShape = (single(ENABLE_DYNAMIC_SHAPE) ?: 0L) != 0L
            )
        }
    }
}
