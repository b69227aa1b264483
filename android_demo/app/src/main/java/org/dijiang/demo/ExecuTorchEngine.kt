package org.dijiang.demo

import org.dijiang.demo.core.LlmEngine
import org.dijiang.demo.core.RunnerStats
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import java.io.Closeable

/**
 * [LlmEngine] over ExecuTorch's LlmModule, whose native TextLLMRunner keeps its position
 * between generate() calls (resetContext() sets it back to 0): each call prefills only the
 * text it is given, after the state the earlier calls left. The dijiang .pte clears its
 * recurrent state in-graph when a call starts at position 0.
 *
 * [seqLen] is the runner's cap on the total position, not on new tokens; the session stops
 * replies at its own max-tokens limit through [onPiece]'s return value.
 */
class ExecuTorchEngine(
    modelPath: String,
    tokenizerPath: String,
    temperature: Float,
    private val seqLen: Int
) : LlmEngine, Closeable {
    private val module = LlmModule(modelPath, tokenizerPath, temperature)

    init {
        module.load() // now, on the loader thread, rather than inside the first reply
    }

    override fun generate(text: String, temperature: Float, onPiece: (String) -> Boolean): RunnerStats {
        var statsJson: String? = null
        var error: String? = null
        val callback = object : LlmCallback {
            override fun onResult(result: String) {
                // stop() takes no lock, so it is safe from inside the runner's callback.
                if (!onPiece(result)) module.stop()
            }

            override fun onStats(stats: String) {
                statsJson = stats
            }

            override fun onError(errorCode: Int, message: String) {
                error = "$message (ExecuTorch error $errorCode)"
            }
        }
        // echo=false: the prompt is not streamed back; no BOS/EOS added: a BOS the template wants is
        // already in chat_format.json's first piece.
        module.generate(text, seqLen, callback, false, temperature, 0, 0)
        val json = statsJson ?: throw IllegalStateException(error ?: "the runner reported no stats")
        return RunnerStats.parse(json) ?: throw IllegalStateException("unreadable runner stats: $json")
    }

    override fun reset() {
        module.resetContext()
    }

    override fun close() {
        module.close()
    }
}
