package org.dijiang.demo.core

/** Why a reply ended. */
enum class EndReason { EOS, MAX_TOKENS, CANCELLED, CONTEXT_FULL }

data class TurnResult(
    val reply: String,
    val endReason: EndReason,
    val stats: RunnerStats,
    /** The text this turn fed into the state (closing of the last reply + the new user turn). */
    val fedText: String,
    /** Tokens in the state after the turn. */
    val position: Long
) {
    /** The runner's decode speed, which excludes prefill. */
    val decodeTokensPerSecond: Double? get() = stats.decodeTokensPerSecond
}

/**
 * A conversation over a stateful [LlmEngine]. Each turn feeds only what is new since the
 * last one (the end of the previous reply and the new user message, in the model's own
 * [format]), at the position where the last turn stopped, so a turn costs the same however
 * long the chat has grown.
 *
 * The reply's last piece is never fed back by the runner, so the session owes it to the
 * state and feeds it first thing next turn: [ChatFormat.between] starts with the EOS text
 * when the reply ended there; the cut-off piece comes before it if a limit or the user
 * stopped the reply. Fed in this order, the texts equal the model's chat template over the
 * whole conversation.
 *
 * [eosTexts] are the decoded texts of the .pte's get_eos_ids; an EOS piece ends the reply
 * and is not shown.
 */
class ChatSession(
    private val engine: LlmEngine,
    private val eosTexts: Set<String>,
    private val maxContextLen: Long,
    private val format: ChatFormat,
    private val nowNanos: () -> Long = { System.nanoTime() }
) {
    /** Tokens in the recurrent state so far (the runner's start position for the next turn). */
    var position = 0L
        private set
    var turns = 0
        private set
    /** Text the state is owed before the next turn's [ChatFormat.between]. */
    private var owed = ""
    @Volatile private var cancelled = false

    val contextFull: Boolean get() = position + 1 >= maxContextLen

    /** Asks the running [send] to stop after the next piece (safe from any thread). */
    fun cancel() {
        cancelled = true
    }

    fun reset() {
        engine.reset()
        position = 0
        turns = 0
        owed = ""
    }

    /** The text the next [send] of [message] will feed. */
    fun textFor(message: String): String =
        if (position == 0L) format.firstTurn(message) else owed + format.nextTurn(message)

    /**
     * Runs one turn and blocks until the reply ends; [onText] receives each visible piece
     * and the live decode rate. If the engine fails, the conversation is reset (its state
     * is no longer known) and the error rethrown.
     */
    fun send(
        message: String,
        maxNewTokens: Int,
        temperature: Float,
        onText: (String, Double?) -> Unit
    ): TurnResult {
        require(maxNewTokens >= 1) { "maxNewTokens must be at least 1" }
        check(!contextFull) { "the context is full ($position tokens): start a new chat" }
        val text = textFor(message)
        cancelled = false
        val reply = StringBuilder()
        val rate = TokenRate(nowNanos)
        var lastPiece = ""
        var sawEos = false
        var stoppedBy: EndReason? = null
        val stats = try {
            engine.generate(text, temperature) { piece ->
                rate.onPiece()
                val eosAt = firstEos(piece)
                val visible = if (eosAt >= 0) piece.substring(0, eosAt) else piece
                reply.append(visible)
                if (visible.isNotEmpty()) onText(visible, rate.perSecond)
                lastPiece = piece
                when {
                    eosAt >= 0 -> { sawEos = true; false }
                    cancelled -> { stoppedBy = EndReason.CANCELLED; false }
                    rate.pieces >= maxNewTokens -> { stoppedBy = EndReason.MAX_TOKENS; false }
                    else -> true
                }
            }
        } catch (e: RuntimeException) {
            reset()
            throw e
        }
        position += stats.positionsFed
        turns++
        val reason = when {
            sawEos -> EndReason.EOS
            stoppedBy != null -> stoppedBy!!
            contextFull -> EndReason.CONTEXT_FULL
            // The runner stopped on an EOS id whose text it decoded to nothing.
            else -> EndReason.EOS
        }
        owed = if (reason == EndReason.EOS) "" else lastPiece
        return TurnResult(reply.toString(), reason, stats, text, position)
    }

    private fun firstEos(piece: String): Int {
        var best = -1
        for (eos in eosTexts) {
            if (eos.length == 0) continue
            val at = piece.indexOf(eos)
            if (at >= 0 && (best < 0 || at < best)) best = at
        }
        return best
    }
}
