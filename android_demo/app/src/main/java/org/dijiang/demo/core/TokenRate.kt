package org.dijiang.demo.core

import java.util.Locale

/**
 * Live decode speed while a reply streams, before the runner's final [RunnerStats] arrive.
 * The first piece closes the prefill, so the rate counts the pieces after it over the time
 * since it: the same split the runner makes between prompt evaluation and decoding.
 *
 * Pieces are what the runner hands the app; a piece can hold more than one token when a
 * character's UTF-8 bytes span tokens, so this can read slightly low on such text.
 */
class TokenRate(private val nowNanos: () -> Long = { System.nanoTime() }) {
    private var firstNanos = 0L
    private var lastNanos = 0L
    var pieces = 0
        private set

    fun onPiece() {
        val t = nowNanos()
        if (pieces == 0) firstNanos = t
        lastNanos = t
        pieces++
    }

    /** Pieces per second after the first one; null until two pieces are apart in time. */
    val perSecond: Double?
        get() {
            val dt = lastNanos - firstNanos
            return if (pieces >= 2 && dt > 0) (pieces - 1) * 1e9 / dt else null
        }

    companion object {
        fun format(tokensPerSecond: Double?): String =
            if (tokensPerSecond == null) "– tok/s" else String.format(Locale.US, "%.1f tok/s", tokensPerSecond)
    }
}
