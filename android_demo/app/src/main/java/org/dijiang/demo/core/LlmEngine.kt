package org.dijiang.demo.core

/**
 * The model as the chat logic sees it: a runner that keeps its recurrent state and its
 * position between calls, like ExecuTorch's TextLLMRunner behind Android's LlmModule.
 * The app implements it over LlmModule; the unit tests over a fake.
 */
interface LlmEngine {
    /**
     * Feeds [text] after everything fed since the last [reset], then samples a reply,
     * handing each decoded piece to [onPiece]. Stops on its own at an EOS id or at the end
     * of the context, or after the piece for which [onPiece] returns false.
     *
     * Like the runner, it never feeds the last piece it hands out back into the state.
     * Blocks until done and returns the runner's stats for this call.
     */
    fun generate(text: String, temperature: Float, onPiece: (String) -> Boolean): RunnerStats

    /** Forgets the conversation: the next call starts at position 0, where the .pte clears its state. */
    fun reset()
}
