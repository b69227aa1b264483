package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

/** The session over SmolLM2's format (its template: [ChatTemplateReference]); other templates: [ChatFormatTest]. */
class ChatSessionTest {
    private val imEnd = "<|im_end|>"
    private val eos = setOf(imEnd)
    private val format = ChatFormatFixtures.SMOLLM2.format
    private fun userTurn(message: String) = "<|im_start|>user\n$message<|im_end|>\n<|im_start|>assistant\n"
    private val closeReply = "$imEnd\n"

    private fun session(runner: FakeRunner, maxContextLen: Long = 1L shl 20) =
        ChatSession(runner, eos, maxContextLen, format)

    private fun ignore(): (String, Double?) -> Unit = { _, _ -> }

    @Test
    fun firstTurnFeedsSystemPromptAndUserTurnOnly() {
        val runner = FakeRunner(listOf(listOf("Hi", "!", imEnd)))
        val s = session(runner)
        val r = s.send("Hello", 64, 0f, ignore())
        assertEquals(ChatTemplateReference.render(listOf("user" to "Hello"), addGenerationPrompt = true), r.fedText)
        assertEquals("Hi!", r.reply)
        assertEquals(EndReason.EOS, r.endReason)
    }

    @Test
    fun multiTurnFeedingEqualsTheTemplateOverTheWholeConversation() {
        val runner = FakeRunner(listOf(
            listOf("Paris", ".", imEnd),
            listOf("About ", "2M", imEnd),
            listOf("Yes", imEnd)))
        val s = session(runner)
        val history = ArrayList<Pair<String, String>>()
        for (question in listOf("Capital of France?", "Population?", "Sure?")) {
            history.add("user" to question)
            val r = s.send(question, 64, 0f, ignore())
            // What the state has seen when the reply starts: the template up to the generation prompt.
            assertEquals(ChatTemplateReference.render(history, true) + r.reply, runner.fed.toString())
            history.add("assistant" to r.reply)
        }
        // Only the closing marker of the last reply is still owed.
        assertEquals(ChatTemplateReference.render(history, false), runner.fed.toString() + closeReply)
        assertEquals(0, runner.resets)
    }

    @Test
    fun laterTurnsFeedOnlyTheNewText() {
        val runner = FakeRunner(listOf(listOf("a", imEnd), listOf("b", imEnd), listOf("c", imEnd)))
        val s = session(runner)
        val first = s.send("one", 8, 0f, ignore())
        val second = s.send("two", 8, 0f, ignore())
        val third = s.send("two", 8, 0f, ignore())
        assertEquals(closeReply + userTurn("two"), second.fedText)
        assertFalse(second.fedText.contains("one"))
        // A turn's prompt does not grow with the conversation.
        assertEquals(second.stats.promptTokens, third.stats.promptTokens)
        assertTrue(first.stats.promptTokens > second.stats.promptTokens) // turn 1 also carries the system prompt
    }

    @Test
    fun positionFollowsTheRunnerStats() {
        val runner = FakeRunner(listOf(listOf("x", "y", "z", imEnd), listOf("w", imEnd)))
        val s = session(runner)
        val r1 = s.send("q", 64, 0f, ignore())
        assertEquals(runner.position, s.position)
        assertEquals(r1.stats.promptTokens + 3, s.position) // x, y, z fed; EOS not
        s.send("q2", 64, 0f, ignore())
        assertEquals(runner.position, s.position)
        assertEquals(2, s.turns)
    }

    @Test
    fun eosIsNeitherShownNorPartOfTheReply() {
        val runner = FakeRunner(listOf(listOf("Hel", "lo", imEnd, "never")))
        val shown = ArrayList<String>()
        val r = session(runner).send("hi", 64, 0f) { piece, _ -> shown.add(piece) }
        assertEquals(listOf("Hel", "lo"), shown)
        assertEquals("Hello", r.reply)
    }

    @Test
    fun eosMergedIntoAPieceKeepsOnlyTheTextBeforeIt() {
        // The Android binding merges pieces while their UTF-8 is incomplete.
        val runner = FakeRunner(listOf(listOf("caf", "é" + imEnd)), eos = "unused")
        val r = session(runner).send("hi", 64, 0f, ignore())
        assertEquals("café", r.reply)
        assertEquals(EndReason.EOS, r.endReason)
    }

    @Test
    fun eosDecodedToNothingStillEndsTheReplyAsEos() {
        val runner = FakeRunner(listOf(listOf("ok", imEnd), listOf("fine", imEnd)), eosDecodesTo = "")
        val s = session(runner)
        val r = s.send("hi", 64, 0f, ignore())
        assertEquals("ok", r.reply)
        assertEquals(EndReason.EOS, r.endReason)
        assertTrue(s.send("and?", 64, 0f, ignore()).fedText.startsWith(closeReply + "<|im_start|>user"))
    }

    @Test
    fun maxTokensCutsTheReplyAndTheCutPieceIsFedNextTurn() {
        val runner = FakeRunner(listOf(listOf("a", "b", "c", "d", imEnd), listOf("e", imEnd)))
        val s = session(runner)
        val r = s.send("q1", 3, 0f, ignore())
        assertEquals("abc", r.reply)
        assertEquals(EndReason.MAX_TOKENS, r.endReason)
        val next = s.send("q2", 3, 0f, ignore())
        assertEquals("c" + closeReply + userTurn("q2"), next.fedText)
        val history = listOf("user" to "q1", "assistant" to "abc", "user" to "q2", "assistant" to "e")
        assertEquals(ChatTemplateReference.render(history, false), runner.fed.toString() + closeReply)
    }

    @Test
    fun cancelStopsAfterTheNextPiece() {
        val runner = FakeRunner(listOf(listOf("a", "b", "c", imEnd)))
        val s = session(runner)
        val r = s.send("q", 64, 0f) { piece, _ -> if (piece == "a") s.cancel() }
        assertEquals("a", r.reply)
        assertEquals(EndReason.CANCELLED, r.endReason)
    }

    @Test
    fun fullContextEndsTheReplyAndRefusesAnotherTurn() {
        val prompt = format.firstTurn("q")
        val runner = FakeRunner(listOf(listOf("a", "b", "c", "d")), maxContextLen = prompt.length + 3L)
        val s = session(runner, maxContextLen = prompt.length + 3L)
        val r = s.send("q", 64, 0f, ignore())
        assertEquals(EndReason.CONTEXT_FULL, r.endReason)
        assertTrue(s.contextFull)
        try {
            s.send("more", 64, 0f, ignore())
            fail("a full context must refuse another turn")
        } catch (e: IllegalStateException) {
            assertTrue(e.message!!.contains("new chat"))
        }
    }

    @Test
    fun resetStartsOverWithTheSystemPrompt() {
        val runner = FakeRunner(listOf(listOf("a", imEnd), listOf("b", imEnd)))
        val s = session(runner)
        s.send("q1", 8, 0f, ignore())
        s.reset()
        assertEquals(0L, s.position)
        assertEquals(1, runner.resets)
        val r = s.send("q2", 8, 0f, ignore())
        assertEquals(ChatTemplateReference.render(listOf("user" to "q2"), true), r.fedText)
    }

    @Test
    fun runnerFailureResetsTheConversationAndRethrows() {
        val runner = FakeRunner(listOf(listOf("a", imEnd), listOf("b", imEnd)), failOnCall = 1)
        val s = session(runner)
        s.send("q1", 8, 0f, ignore())
        try {
            s.send("q2", 8, 0f, ignore())
            fail("the runner's error must reach the caller")
        } catch (e: IllegalStateException) {
            assertEquals("runner failed", e.message)
        }
        assertEquals(0L, s.position)
        assertEquals(1, runner.resets)
    }

    @Test
    fun liveRateComesWithThePiecesAndTheFinalRateFromTheStats() {
        var now = 0L
        val runner = FakeRunner(listOf(listOf("a", "b", "c", imEnd)))
        val s = ChatSession(runner, eos, 1L shl 20, format, nowNanos = { now += 50_000_000L; now })
        val rates = ArrayList<Double?>()
        val r = s.send("q", 64, 0f) { _, rate -> rates.add(rate) }
        assertEquals(null, rates[0])
        assertEquals(20.0, rates[2]!!, 1e-9) // one piece per 50 ms
        // FakeRunner: a, b, c fed back over four 10 ms samples (the EOS one included).
        assertEquals(3 * 1000.0 / 40, r.decodeTokensPerSecond!!, 1e-9)
    }

    @Test
    fun maxNewTokensMustBePositive() {
        try {
            session(FakeRunner(listOf(listOf("a")))).send("q", 0, 0f, ignore())
            fail("0 max tokens must be refused")
        } catch (e: IllegalArgumentException) {
            assertTrue(e.message!!.contains("maxNewTokens"))
        }
    }
}
