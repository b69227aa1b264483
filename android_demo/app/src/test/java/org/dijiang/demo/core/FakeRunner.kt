package org.dijiang.demo.core

/**
 * An [LlmEngine] that behaves like ExecuTorch's TextLLMRunner where the session depends on
 * it: state and position carry over between calls, each call prefills its text at the
 * current position, the first piece comes from prefill, and every piece but the last one
 * handed out is fed back. Replies are scripted, one list of pieces per call; the script's
 * [eos] piece stops generation the way an id from get_eos_ids does.
 *
 * A "token" here is one character of fed text or one piece, enough to check positions.
 */
class FakeRunner(
    private val replies: List<List<String>>,
    private val eos: String = "<|im_end|>",
    /** What the runner's tokenizer decodes the EOS id to (pytorch/tokenizers may give ""). */
    private val eosDecodesTo: String = eos,
    private val maxContextLen: Long = Long.MAX_VALUE,
    private val failOnCall: Int = -1
) : LlmEngine {
    /** Everything fed into the state since the last reset, in order. */
    val fed = StringBuilder()
    var position = 0L
        private set
    var calls = 0
        private set
    var resets = 0
        private set
    val texts = ArrayList<String>()
    private var clockMs = 1000L

    override fun generate(text: String, temperature: Float, onPiece: (String) -> Boolean): RunnerStats {
        require(text.isNotEmpty()) { "the runner rejects an empty prompt" }
        val call = calls++
        if (call == failOnCall) throw IllegalStateException("runner failed")
        texts.add(text)
        val start = clockMs
        fed.append(text)
        position += text.length
        val promptEnd = tick(text.length.toLong())
        var generated = 0L
        for (piece in replies[call]) {
            val shown = if (piece == eos) eosDecodesTo else piece
            tick(10)
            val goOn = onPiece(shown)
            if (piece == eos || !goOn || position + 1 >= maxContextLen) break
            fed.append(piece) // fed only once the runner samples the next token
            position++
            generated++
        }
        val end = tick(0)
        return RunnerStats(
            promptTokens = text.length.toLong(), generatedTokens = generated,
            inferenceStartMs = start, promptEvalEndMs = promptEnd, inferenceEndMs = end,
            firstTokenMs = promptEnd
        )
    }

    override fun reset() {
        resets++
        fed.setLength(0)
        position = 0
    }

    private fun tick(ms: Long): Long {
        clockMs += ms
        return clockMs
    }
}
