package org.dijiang.demo.core

import java.util.Locale

/**
 * The size of a model's recurrent state: what replaces the KV cache and stays the same at
 * every conversation length. Read from the export's manifest.json, which lists the state
 * tensors of each exported file (DESIGN.md section 3).
 */
data class StateSize(val bytes: Long, val tensors: Int) {
    /** Decimal megabytes, as the dijiang-export CLI prints them. */
    fun describe(): String = String.format(Locale.US, "%.2f MB in %d tensors", bytes / 1e6, tensors)

    companion object {
        /**
         * The state of the `.pte` named [pteName] in [manifestJson]; falls back to the first
         * `.pte` entry (the file may be renamed on the phone), then to the manifest's
         * per-layer `state_shape` times [nLayers] in float32. Null when none is present.
         */
        fun fromManifest(manifestJson: String, pteName: String?, nLayers: Long?): StateSize? {
            val root = Json.parse(manifestJson)
            val files = root.field("files").asList() ?: emptyList<Any?>()
            val ptes = files.filter { it.field("format") == "pte" }
            val entry = ptes.firstOrNull { it.field("path") == pteName } ?: ptes.firstOrNull()
            val states = entry.field("state").asList()
            if (states != null && states.isNotEmpty()) {
                var total = 0L
                for (s in states) {
                    val shape = shapeOf(s.field("shape")) ?: return null
                    total += elements(shape) * bytesPerElement(s.field("dtype") as? String)
                }
                return StateSize(total, states.size)
            }
            val perLayer = shapeOf(root.field("state_shape")) ?: return null
            val layers = nLayers ?: root.field("model").field("n_layers").asLong() ?: return null
            return StateSize(elements(perLayer) * 4 * layers, layers.toInt())
        }

        private fun shapeOf(v: Any?): List<Long>? {
            val list = v.asList() ?: return null
            val dims = list.mapNotNull { it.asLong() }
            return if (dims.size == list.size) dims else null
        }

        private fun elements(shape: List<Long>): Long = shape.fold(1L) { acc, d -> acc * d }

        private fun bytesPerElement(dtype: String?): Long = when (dtype) {
            "float16", "bfloat16" -> 2
            "int8", "uint8" -> 1
            "float64", "int64" -> 8
            else -> 4 // float32, the state's dtype in every dijiang-edge export
        }
    }
}
